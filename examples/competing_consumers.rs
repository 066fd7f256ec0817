//! Competing consumers: three workers in one group share a topic's messages, and each
//! customer's messages (one key) are still handled one at a time, in publish order.
//!
//! Run: `cargo run --example competing_consumers [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! Each worker is a member of one group running 8 handlers at once (`Consumer::members(3)`
//! makes three identical members; here each has its own handler, to count its share).
//! Different customers' events overlap; one customer's queue behind each other. The exit
//! status is 0 only when every event was handled, none out of order or beside another of
//! its customer.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::{App, CancellationToken, Consumer, HandlerError, Json, Message, SubscribeOptions};

const CUSTOMERS: u64 = 6;
const PER_CUSTOMER: u64 = 10;
const WORKERS: usize = 3;

#[derive(serde::Serialize, serde::Deserialize)]
struct Shipment {
    customer: u64,
    seq: u64, // 0, 1, 2, … per customer, in publish order
}

/// What the workers saw, per customer: the next expected seq and whether one runs.
#[derive(Default)]
struct Book {
    next: HashMap<u64, u64>,
    running: HashSet<u64>,
    handled_by: [u64; WORKERS],
    violations: u64,
}

/// One worker's handler: checks the customer's order on entry, works, then books it.
async fn ship(book: Arc<Mutex<Book>>, worker: usize, s: Shipment) -> Result<(), HandlerError> {
    {
        let mut b = book.lock().unwrap();
        let in_order = b.next.get(&s.customer).copied().unwrap_or(0) == s.seq;
        let started_twice = !b.running.insert(s.customer);
        b.violations += u64::from(started_twice || !in_order);
    }
    // The work: long enough for the customers' events to overlap.
    tokio::time::sleep(Duration::from_millis(2 + s.seq % 3)).await;
    let mut b = book.lock().unwrap();
    b.running.remove(&s.customer);
    b.next.insert(s.customer, s.seq + 1);
    b.handled_by[worker] += 1;
    Ok(())
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // Names of their own per run, so leftovers never mix in; ephemeral groups leave none.
    let run = switchyard::new_id()[24..].to_string();
    let topic = format!("shipments-{run}");
    let book: Arc<Mutex<Book>> = Arc::default();

    let mut app = App::new(broker.clone());
    for worker in 0..WORKERS {
        let book = book.clone();
        let handler = move |Json(s)| ship(book.clone(), worker, s);
        // Same topic, same group: the members compete for its messages.
        let options = SubscribeOptions::new(&topic, format!("shipping-{run}")).ephemeral(true);
        app = app.consumer(Consumer::handler(options, handler).concurrency(8));
    }
    let shutdown = CancellationToken::new();
    let running = app.start(shutdown.clone()).await?;

    // Interleaved customers, as independent orders arrive; the customer is the key.
    let mut messages = Vec::new();
    for seq in 0..PER_CUSTOMER {
        for customer in 0..CUSTOMERS {
            let message = Message::json(&Shipment { customer, seq })?;
            messages.push(message.with_key(format!("customer-{customer}")));
        }
    }
    broker.publish_batch(&topic, messages).await?;

    let total = CUSTOMERS * PER_CUSTOMER;
    let handled = || book.lock().unwrap().handled_by.iter().sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(60);
    while handled() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    running.join().await?;
    broker.close().await?;

    let handled = handled();
    let b = book.lock().unwrap();
    let all_done = b.next.len() as u64 == CUSTOMERS && b.next.values().all(|&n| n == PER_CUSTOMER);
    let ok = handled == total && all_done && b.violations == 0;
    println!(
        "summary events={total} handled={handled} per_worker={:?} order_violations={}",
        b.handled_by, b.violations
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
