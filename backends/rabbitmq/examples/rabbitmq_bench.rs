//! Throughput of the RabbitMQ backend against raw lapin.
//!
//! `cargo run --release -p switchyard-rabbitmq --example rabbitmq_bench -- [--messages N]
//! [--rounds R] [--url U] [--topologies | --rpc] [--requests N] [--in-flight K]
//! [--rpc-shapes]`
//!
//! Every side publishes N persistent 256-byte messages with publisher confirms, awaited
//! in windows of 1024 (switchyard: `publish_batch` of 1024), then consumes them with one
//! ack per message. Raw lapin runs twice: through switchyard's own topology (the topic's
//! direct exchange, routing key = slot number round-robin, a group's 8 partition queues,
//! prefetch 1000 per partition consumer), and on the best topology for the same
//! durability, one plain durable queue through the default exchange (prefetch 1000).
//! Rounds alternate the order of the sides; each figure is the median over the rounds.
//! Prints `pair=<name> switchyard=<msgs/s> raw=<msgs/s> ratio=<r>` for
//! `rabbitmq-publish` and `rabbitmq-consume` (same topology) and
//! `rabbitmq-publish-vs-plain` and `rabbitmq-consume-vs-plain`, and before them, per
//! side, the CPU time and context switches this process spent per message (from
//! `/proc`, on Linux), which separate the client's cost from the broker's.
//!
//! `--topologies` instead measures raw lapin publishing to one group's 8 queues through
//! each routing on offer: the plain queue, a direct exchange with slot bindings, a topic
//! exchange with `#.<bits>` bindings, and the consistent-hash exchange when its plugin
//! is enabled. Prints `topology=<name> publish=<msgs/s>` per round.
//!
//! After the pairs (or alone, with `--rpc`), the request/reply pair `rabbitmq-rpc`:
//! `--requests` round trips (default 20,000), `--in-flight` at once (default 64), see
//! `rabbitmq_bench/rpc.rs`; `--rpc-shapes` adds raw lapin reshaped step by step like a
//! switchyard member (a channel per partition, then a task per partition too).

use std::time::Instant;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use switchyard_core::{Broker, Message, SubscribeOptions};

#[path = "rabbitmq_bench/rpc.rs"]
mod rpc;

const WINDOW: usize = 1024;
const PREFETCH: usize = 1000;
const PARTITIONS: u32 = 8;
const SLOTS: usize = 1024;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn number(name: &str, default: usize) -> usize {
    arg(name).map_or(default, |s| {
        s.parse()
            .unwrap_or_else(|_| panic!("{name} takes a number, not {s:?}"))
    })
}

fn unique(label: &str) -> String {
    format!("bench-{label}-{}", std::process::id())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// This process's CPU seconds (user + system) and context switches (all threads) so
/// far, from `/proc`; `None` where there is none. Both sides run in this process one
/// after the other, so the difference across a side is that side's cost.
fn usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command's closing parenthesis; utime and stime are the 12th and
    // 13th of them, in clock ticks (100 a second on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let mut switches = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        for l in status.lines() {
            if l.starts_with("voluntary_ctxt_switches")
                || l.starts_with("nonvoluntary_ctxt_switches")
            {
                switches += l.split_whitespace().last()?.parse::<u64>().ok()?;
            }
        }
    }
    Some((ticks as f64 / 100.0, switches))
}

/// Adds what this process spent since `before` (a [`usage`] reading) to `spent`.
fn add_since(spent: &mut (f64, u64), before: Option<(f64, u64)>) {
    if let (Some(b), Some(a)) = (before, usage()) {
        spent.0 += a.0 - b.0;
        spent.1 += a.1 - b.1;
    }
}

fn line(pair: &str, ours: f64, raw: f64) {
    println!(
        "pair={pair} switchyard={ours:.0} raw={raw:.0} ratio={:.2}",
        ours / raw
    );
}

/// Where raw lapin publishes: an exchange and the routing keys it cycles through.
struct Route {
    exchange: String,
    keys: Vec<String>,
}

impl Route {
    /// Switchyard's routing: the topic's direct exchange, slot numbers round-robin.
    fn slots(exchange: &str) -> Self {
        Self {
            exchange: exchange.to_string(),
            keys: (0..SLOTS).map(|s| s.to_string()).collect(),
        }
    }

    /// The default exchange straight into one queue.
    fn plain(queue: &str) -> Self {
        Self {
            exchange: String::new(),
            keys: vec![queue.to_string()],
        }
    }
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch
}

async fn raw_publish(ch: &Channel, route: &Route, n: usize) -> f64 {
    let payload = vec![b'x'; 256];
    let start = Instant::now();
    let mut pending = Vec::with_capacity(WINDOW);
    for i in 0..n {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(switchyard_core::new_id().into());
        let confirm = ch
            .basic_publish(
                route.exchange.as_str().into(),
                route.keys[i % route.keys.len()].as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &payload,
                props,
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() == WINDOW || i + 1 == n {
            for c in pending.drain(..) {
                assert_eq!(c.await.expect("confirm"), Confirmation::Ack(None));
            }
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn raw_consume(conn: &Connection, queues: &[String], n: usize) -> f64 {
    let ch = conn.create_channel().await.expect("channel");
    // PREFETCH per consumer, as switchyard's broker-side window.
    ch.basic_qos(PREFETCH as u16, BasicQosOptions { global: false })
        .await
        .expect("qos");
    let mut consumers = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        let consumer = ch
            .basic_consume(
                q.as_str().into(),
                format!("raw-{i}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        consumers.push(consumer);
    }
    let mut all = futures::stream::select_all(consumers);
    let start = Instant::now();
    for _ in 0..n {
        let d = all.next().await.expect("a delivery").expect("delivery");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = ch.close(200, "done".into()).await;
    rate
}

async fn switchyard_publish(broker: &dyn Broker, topic: &str, n: usize) -> f64 {
    let payload = switchyard_core::Bytes::from(vec![b'x'; 256]);
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Message> = (sent..n.min(sent + WINDOW))
            .map(|_| Message::new(payload.clone()))
            .collect();
        sent += batch.len();
        broker.publish_batch(topic, batch).await.expect("publish");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn switchyard_consume(broker: &dyn Broker, topic: &str, n: usize) -> f64 {
    let mut sub = broker
        .subscribe(SubscribeOptions::new(topic, "g").prefetch(PREFETCH))
        .await
        .expect("subscribe");
    let start = Instant::now();
    let mut got = 0;
    let mut buf = Vec::with_capacity(PREFETCH);
    while got < n {
        let k = sub.recv_many(&mut buf, PREFETCH).await.expect("recv");
        assert!(k > 0, "subscription ended");
        for d in buf.drain(..) {
            d.ack().await.expect("ack");
        }
        got += k;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    sub.close().await.expect("close");
    rate
}

/// Subscribing declares the exchange and the group's queues; closing leaves them.
async fn declare_group(broker: &dyn Broker, topic: &str) {
    let sub = broker
        .subscribe(SubscribeOptions::new(topic, "g").prefetch(PREFETCH))
        .await
        .expect("subscribe");
    sub.close().await.expect("close");
}

fn partition_queues(topic: &str) -> Vec<String> {
    (0..PARTITIONS).map(|p| format!("{topic}:g.p{p}")).collect()
}

async fn declare_queue(ch: &Channel, queue: &str) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare queue");
}

async fn delete(conn: &Connection, queues: &[String], exchanges: &[String]) {
    let ch = conn.create_channel().await.expect("channel");
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in exchanges {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = ch.close(200, "done".into()).await;
}

/// The pairs: switchyard against raw lapin on its own topology and on a plain queue.
async fn pairs(url: &str, n: usize, rounds: usize) {
    let broker = switchyard_rabbitmq::connect(&format!("{url}?partitions={PARTITIONS}"))
        .await
        .expect("connect");
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect raw");
    let (ours, theirs, plain) = (unique("sy"), unique("raw"), unique("plain"));
    declare_group(&*broker, &ours).await;
    declare_group(&*broker, &theirs).await;
    let ch = confirm_channel(&conn).await;
    declare_queue(&ch, &plain).await;
    let (topology, plain_route) = (Route::slots(&theirs), Route::plain(&plain));
    let mut rates: [Vec<f64>; 6] = Default::default();
    let mut spent = [(0.0, 0); 6];
    for round in 0..rounds {
        // Alternate the order so no side always runs on a warmer broker.
        let mut publish_order = [0, 1, 2];
        if round % 2 == 1 {
            publish_order.reverse();
        }
        for side in publish_order {
            let before = usage();
            let rate = match side {
                0 => switchyard_publish(&*broker, &ours, n).await,
                1 => raw_publish(&ch, &topology, n).await,
                _ => raw_publish(&ch, &plain_route, n).await,
            };
            add_since(&mut spent[side], before);
            rates[side].push(rate);
        }
        for side in publish_order {
            let before = usage();
            let rate = match side {
                0 => switchyard_consume(&*broker, &ours, n).await,
                1 => raw_consume(&conn, &partition_queues(&theirs), n).await,
                _ => raw_consume(&conn, std::slice::from_ref(&plain), n).await,
            };
            add_since(&mut spent[3 + side], before);
            rates[3 + side].push(rate);
        }
        eprintln!(
            "round {round}: publish sy={:.0} raw={:.0} plain={:.0}; consume sy={:.0} raw={:.0} plain={:.0}",
            rates[0][round], rates[1][round], rates[2][round], rates[3][round], rates[4][round], rates[5][round]
        );
    }
    let msgs = (n * rounds) as f64;
    let per = |i: usize| (spent[i].0 * 1e6 / msgs, spent[i].1 as f64 / msgs);
    for (what, first) in [("publish", 0), ("consume", 3)] {
        let [(sy_cpu, sy_sw), (raw_cpu, raw_sw), (plain_cpu, plain_sw)] =
            [per(first), per(first + 1), per(first + 2)];
        println!(
            "note: {what}, this process per message: cpu_us sy={sy_cpu:.1} raw={raw_cpu:.1} \
             plain={plain_cpu:.1}; context_switches sy={sy_sw:.2} raw={raw_sw:.2} plain={plain_sw:.2}"
        );
    }
    let [sy_pub, raw_pub, plain_pub, sy_con, raw_con, plain_con] = rates.map(median);
    line("rabbitmq-publish", sy_pub, raw_pub);
    line("rabbitmq-consume", sy_con, raw_con);
    line("rabbitmq-publish-vs-plain", sy_pub, plain_pub);
    line("rabbitmq-consume-vs-plain", sy_con, plain_con);

    broker.close().await.expect("close");
    let mut queues = partition_queues(&ours);
    queues.extend(partition_queues(&theirs));
    queues.extend([
        format!("{ours}:g.members"),
        format!("{theirs}:g.members"),
        plain,
    ]);
    delete(&conn, &queues, &[ours, theirs]).await;
    let _ = conn.close(200, "done".into()).await;
}

/// Eight queues behind an exchange of `kind`, each bound with what `bindings` gives
/// for its number.
async fn routed_queues(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    bindings: impl Fn(u32) -> Vec<String>,
) -> Vec<String> {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exchange");
    let queues = partition_queues(name);
    for (p, q) in (0..PARTITIONS).zip(&queues) {
        declare_queue(ch, q).await;
        for key in bindings(p) {
            ch.queue_bind(
                q.as_str().into(),
                name.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        }
    }
    queues
}

/// The routing key of a slot for the topic-exchange routing: its 10 bits, dotted.
fn slot_bits(slot: usize) -> String {
    (0..10)
        .rev()
        .map(|bit| if slot >> bit & 1 == 1 { "1" } else { "0" })
        .collect::<Vec<_>>()
        .join(".")
}

/// Raw publish rates through each routing on offer, for choosing the topology.
async fn topologies(url: &str, n: usize, rounds: usize) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect raw");
    let ch = conn.create_channel().await.expect("channel");
    let plain = unique("t-plain");
    declare_queue(&ch, &plain).await;
    let direct = unique("t-direct");
    let direct_queues = routed_queues(&ch, &direct, ExchangeKind::Direct, |p| {
        (p as usize..SLOTS)
            .step_by(PARTITIONS as usize)
            .map(|s| s.to_string())
            .collect()
    })
    .await;
    let topic = unique("t-topic");
    let topic_queues = routed_queues(&ch, &topic, ExchangeKind::Topic, |p| {
        let bits: String = (0..PARTITIONS.trailing_zeros())
            .rev()
            .map(|bit| if p >> bit & 1 == 1 { ".1" } else { ".0" })
            .collect();
        vec![format!("#{bits}")]
    })
    .await;
    // Present only with `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`; a
    // refused declaration closes the channel, so it is tried on its own.
    let hash = unique("t-hash");
    let probe = conn.create_channel().await.expect("channel");
    let hash_kind = ExchangeKind::Custom("x-consistent-hash".into());
    let hash_queues = match probe
        .exchange_declare(
            hash.as_str().into(),
            hash_kind.clone(),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => Some(routed_queues(&ch, &hash, hash_kind, |_| vec!["1".to_string()]).await),
        Err(e) => {
            eprintln!("topology=consistent-hash unavailable: {e}");
            None
        }
    };
    let mut routes = vec![
        ("plain-queue", Route::plain(&plain)),
        ("direct-slots", Route::slots(&direct)),
        (
            "topic-bits",
            Route {
                exchange: topic.clone(),
                keys: (0..SLOTS).map(slot_bits).collect(),
            },
        ),
    ];
    if hash_queues.is_some() {
        routes.push(("consistent-hash", Route::slots(&hash)));
    }
    let publisher = confirm_channel(&conn).await;
    let mut all_queues = vec![plain.clone()];
    all_queues.extend(direct_queues);
    all_queues.extend(topic_queues);
    all_queues.extend(hash_queues.unwrap_or_default());
    for round in 0..rounds {
        for (name, route) in &routes {
            let rate = raw_publish(&publisher, route, n).await;
            println!("topology={name} round={round} publish={rate:.0}");
        }
        for q in &all_queues {
            let _ = ch
                .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
                .await;
        }
    }
    delete(&conn, &all_queues, &[direct, topic, hash]).await;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::main]
async fn main() {
    let n = number("--messages", 50_000);
    let rounds = number("--rounds", 3).max(1);
    let url = arg("--url").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let rpc_pair = || {
        rpc::pair(
            &url,
            number("--requests", 20_000),
            number("--in-flight", 64),
            rounds,
            std::env::args().any(|a| a == "--rpc-shapes"),
        )
    };
    if std::env::args().any(|a| a == "--topologies") {
        topologies(&url, n, rounds).await;
    } else if std::env::args().any(|a| a == "--rpc") {
        rpc_pair().await;
    } else {
        pairs(&url, n, rounds).await;
        rpc_pair().await;
    }
}
