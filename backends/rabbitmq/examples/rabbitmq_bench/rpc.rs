//! The request/reply pair: `Broker::request` to a `reply_fn` responder and back, against
//! raw lapin doing the same round trips on the same topology.
//!
//! Both sides: a requester client and a responder client (a connection each), K
//! requests in flight, N in all, 256-byte payloads. A request is published transient to
//! the topic's direct exchange (slot routing keys round-robin) with `reply_to =
//! amq.rabbitmq.reply-to`, a `correlation_id` and an `expiration`, on the channel that
//! consumes direct reply-to, and its confirm awaited; the responder takes it from the
//! group's 8 partition queues, publishes the reply to the default exchange (confirm
//! awaited) and then acks the request. Raw lapin matches replies to requests through a
//! map of correlation ids, as the requester does. Each side's clock starts after its
//! first reply (so the responder member's partition claims are not timed). A warm-up
//! round, then R rounds in alternating order; prints each side's CPU time per request
//! and the medians as `pair=rabbitmq-rpc switchyard=<req/s> raw=<req/s> ratio=<r>`.
//! With `--rpc-shapes`, the rounds also run raw lapin with a channel per partition
//! queue, and then also a task per queue, and a note line gives their figures: what
//! switchyard's shape costs before any code of its own runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use switchyard_core::{
    reply_fn, Bytes, CancellationToken, Consumer, Delivery, HandlerError, Message, SubscribeOptions,
};
use tokio::sync::oneshot;

use crate::{
    add_since, confirm_channel, declare_group, delete, line, median, partition_queues, unique,
    usage,
};

const PAYLOAD: usize = 256;
const TIMEOUT: Duration = Duration::from_secs(30);

async fn echo(d: Delivery) -> Result<Bytes, HandlerError> {
    Ok(d.message().payload.clone())
}

/// Requests per second through `Broker::request` to a `reply_fn` responder.
async fn switchyard(url: &str, topic: &str, n: usize, in_flight: usize) -> f64 {
    let responder_broker = switchyard_rabbitmq::connect(url).await.expect("connect");
    let requester = switchyard_rabbitmq::connect(url).await.expect("connect");
    let stop = CancellationToken::new();
    let responder = Consumer::new(
        SubscribeOptions::new(topic, "g"),
        reply_fn(responder_broker.clone(), echo),
    )
    .concurrency(in_flight)
    .start(responder_broker.clone(), stop.clone())
    .await
    .expect("start the responder");
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    // The clock starts once the responder answers (its member has claimed partitions).
    requester
        .request(topic, Message::new(payload.clone()), TIMEOUT)
        .await
        .expect("a first reply");
    let start = Instant::now();
    let answered = futures::stream::iter(0..n)
        .map(|_| {
            let (requester, payload) = (requester.clone(), payload.clone());
            async move {
                let reply = requester.request(topic, Message::new(payload), TIMEOUT);
                reply.await.expect("a reply").payload.len()
            }
        })
        .buffer_unordered(in_flight)
        .filter(|len| futures::future::ready(*len == PAYLOAD))
        .count()
        .await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(answered, n);
    stop.cancel();
    responder.join().await.expect("responder");
    requester.close().await.expect("close");
    responder_broker.close().await.expect("close");
    rate
}

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// How the raw responder reads the group's partition queues. `--rpc-shapes` measures the
/// last two beside the pair: they take raw lapin step by step to the shape of a
/// switchyard member, which owns each partition through a channel of its own (closing it
/// hands the partition's unsettled messages back) and reads each with a task of its own.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One channel consuming every queue: the least a client can do.
    OneChannel,
    /// A channel per queue.
    ChannelPerQueue,
    /// A channel per queue, and a task per queue handing its deliveries to the handlers.
    TaskPerQueue,
}

/// A channel with a prefetch of `in_flight` per consumer.
async fn consume_channel(conn: &Connection, in_flight: usize) -> Channel {
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_qos(in_flight as u16, BasicQosOptions { global: false })
        .await
        .expect("qos");
    channel
}

/// The raw responder: answers every request from the group's partition queues, up to
/// `in_flight` at once, until `stop`.
async fn raw_responder(
    conn: Connection,
    topic: String,
    in_flight: usize,
    shape: Shape,
    stop: CancellationToken,
) {
    // Only the one-channel shape shares a channel; the others open one per queue.
    let shared = match shape {
        Shape::OneChannel => Some(consume_channel(&conn, in_flight).await),
        Shape::ChannelPerQueue | Shape::TaskPerQueue => None,
    };
    let reply = confirm_channel(&conn).await;
    let mut consumers = Vec::new();
    for (i, q) in partition_queues(&topic).iter().enumerate() {
        let channel = match &shared {
            Some(channel) => channel.clone(),
            None => consume_channel(&conn, in_flight).await,
        };
        let consumer = channel
            .basic_consume(
                q.as_str().into(),
                format!("rpc-{i}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        consumers.push(consumer);
    }
    let requests = if shape == Shape::TaskPerQueue {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for mut consumer in consumers {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(d) = consumer.next().await {
                    if tx.send(d).is_err() {
                        break;
                    }
                }
            });
        }
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (d, rx)) })
            .boxed()
    } else {
        futures::stream::select_all(consumers).boxed()
    };
    let requests = requests.take_until(stop.cancelled_owned());
    requests
        .for_each_concurrent(in_flight, |d| {
            let reply = reply.clone();
            async move {
                let d = d.expect("delivery");
                let props = BasicProperties::default()
                    .with_delivery_mode(1)
                    .with_correlation_id(d.properties.correlation_id().clone().expect("id"));
                let to = d.properties.reply_to().clone().expect("reply_to");
                let confirm = reply
                    .basic_publish(
                        "".into(),
                        to,
                        BasicPublishOptions::default(),
                        &d.data,
                        props,
                    )
                    .await
                    .expect("publish reply");
                confirm.await.expect("reply confirm");
                d.ack(BasicAckOptions::default()).await.expect("ack");
            }
        })
        .await;
    let _ = conn.close(200, "done".into()).await;
}

/// Requests per second through raw lapin: direct reply-to and a correlation map.
async fn raw(url: &str, topic: &str, n: usize, in_flight: usize, shape: Shape) -> f64 {
    let responder_conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect raw");
    let stop = CancellationToken::new();
    let responder = tokio::spawn(raw_responder(
        responder_conn,
        topic.to_string(),
        in_flight,
        shape,
        stop.clone(),
    ));
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect raw");
    let ch: Channel = confirm_channel(&conn).await;
    let mut replies = ch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume direct reply-to");
    let waiting: Waiting = Arc::default();
    let reader = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = replies.next().await {
                let id = d.properties.correlation_id().clone().expect("id");
                if let Some(tx) = waiting.lock().unwrap().remove(id.as_str()) {
                    let _ = tx.send(d.data);
                }
            }
        })
    };
    let payload = vec![b'x'; PAYLOAD];
    let next = AtomicU64::new(0);
    let expiration = TIMEOUT.as_millis().to_string();
    let ask = |_| {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let (ch, waiting, payload, expiration) = (&ch, &waiting, &payload, &expiration);
        async move {
            let id = i.to_string();
            let (tx, rx) = oneshot::channel();
            waiting.lock().unwrap().insert(id.clone(), tx);
            let props = BasicProperties::default()
                .with_delivery_mode(1)
                .with_message_id(switchyard_core::new_id().into())
                .with_reply_to("amq.rabbitmq.reply-to".into())
                .with_correlation_id(id.into())
                .with_expiration(expiration.as_str().into());
            let slot = (i % 1024).to_string();
            let confirm = ch
                .basic_publish(
                    topic.into(),
                    slot.as_str().into(),
                    BasicPublishOptions::default(),
                    payload,
                    props,
                )
                .await
                .expect("publish request");
            confirm.await.expect("request confirm");
            tokio::time::timeout(TIMEOUT, rx)
                .await
                .expect("a reply in time")
                .expect("reply")
                .len()
        }
    };
    // The clock starts once the responder answers, as on the switchyard side.
    assert_eq!(ask(0).await, PAYLOAD);
    let start = Instant::now();
    let answered = futures::stream::iter(0..n)
        .map(ask)
        .buffer_unordered(in_flight)
        .filter(|len| futures::future::ready(*len == PAYLOAD))
        .count()
        .await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(answered, n);
    stop.cancel();
    responder.await.expect("responder");
    reader.abort();
    let _ = conn.close(200, "done".into()).await;
    rate
}

/// The pair, on a topic of each side's own.
pub(crate) async fn pair(url: &str, n: usize, in_flight: usize, rounds: usize, shapes: bool) {
    let (ours, theirs) = (unique("rpc-sy"), unique("rpc-raw"));
    let setup = switchyard_rabbitmq::connect(url).await.expect("connect");
    declare_group(&*setup, &ours).await;
    declare_group(&*setup, &theirs).await;
    setup.close().await.expect("close");
    // Warm-up: connections, the broker's queue processes, the allocator.
    switchyard(url, &ours, n / 10, in_flight).await;
    raw(url, &theirs, n / 10, in_flight, Shape::OneChannel).await;
    // Side 0 is switchyard, the others raw lapin in these shapes.
    let mut sides = vec![None, Some(Shape::OneChannel)];
    if shapes {
        sides.extend([Some(Shape::ChannelPerQueue), Some(Shape::TaskPerQueue)]);
    }
    let mut rates = vec![Vec::new(); sides.len()];
    let mut spent = vec![(0.0, 0); sides.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for side in order {
            let before = usage();
            let rate = match sides[side] {
                None => switchyard(url, &ours, n, in_flight).await,
                Some(shape) => raw(url, &theirs, n, in_flight, shape).await,
            };
            add_since(&mut spent[side], before);
            rates[side].push(rate);
        }
        let shown: Vec<String> = rates.iter().map(|r| format!("{:.0}", r[round])).collect();
        eprintln!(
            "round {round}: rpc sy={} raw={}{} req/s ({in_flight} in flight)",
            shown[0],
            shown[1],
            if shapes {
                format!(
                    " channel-per-queue={} task-per-queue={}",
                    shown[2], shown[3]
                )
            } else {
                String::new()
            }
        );
    }
    // CPU per request: every round of a side runs n requests, plus one untimed first.
    // (Context switches are left out: each side's connections close when it ends, and
    // the switches of their finished threads are no longer counted.)
    let cost: Vec<f64> = spent
        .iter()
        .map(|(cpu, _)| cpu * 1e6 / (rounds * n) as f64)
        .collect();
    println!(
        "note: rpc, this process per request: cpu_us sy={:.1} raw={:.1}",
        cost[0], cost[1]
    );
    let medians: Vec<f64> = rates.into_iter().map(median).collect();
    if shapes {
        println!(
            "note: raw lapin in switchyard's shape: a channel per partition {:.0} req/s ({:.1} cpu_us per request), and a task per partition {:.0} req/s ({:.1} cpu_us)",
            medians[2], cost[2], medians[3], cost[3]
        );
    }
    line("rabbitmq-rpc", medians[0], medians[1]);
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect raw");
    let mut queues = partition_queues(&ours);
    queues.extend(partition_queues(&theirs));
    queues.extend([format!("{ours}:g.members"), format!("{theirs}:g.members")]);
    delete(&conn, &queues, &[ours, theirs]).await;
    let _ = conn.close(200, "done".into()).await;
}
