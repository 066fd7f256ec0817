//! RabbitMQ-specific behaviour, against the real broker (127.0.0.1:5672, guest/guest;
//! `SWITCHYARD_AMQP_URL` overrides). These tests fail, never skip, when the broker is
//! unreachable. Each uses random names and deletes what it created.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cleanup_groups, raw, unique, url};
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ExchangeKind};
use switchyard_conformance::support::Tally;
use switchyard_core::{
    Broker, CancellationToken, Consumer, Delivery, Error, HandlerError, Message, Publisher,
    SubscribeOptions, Subscriber,
};
use switchyard_rabbitmq::{DeclareConflict, RabbitBroker, Unroutable};

/// Ready messages and consumers of a queue.
async fn queue_stats(conn: &Connection, queue: &str) -> (u32, u32) {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (q.message_count(), q.consumer_count())
}

/// Closes every connection whose client-given name contains `marker` (only this test's
/// connections, so other users of the broker are not disturbed), the way
/// `rabbitmqctl close_all_connections` would close them all. A connection that closes
/// between being listed and being asked for its name is skipped (it raced us: `noproc`),
/// and so is one still in its handshake, whose client properties are `none` until the
/// client sends them (a reconnecting client of this test, a moment too early).
fn kill_connections(marker: &str) -> usize {
    let expr = format!(
        "length([rabbit_networking:close_connection(P, \"test\") || P <- rabbit_networking:connections(), \
         {{client_properties, CP}} <- (try rabbit_networking:connection_info(P, [client_properties]) catch _:_ -> [] end), \
         is_list(CP), \
         {{<<\"connection_name\">>, longstr, N}} <- CP, binary:match(N, <<\"{marker}\">>) =/= nomatch]).",
    );
    let out = Command::new("rabbitmqctl")
        .args(["eval", &expr])
        .output()
        .expect("rabbitmqctl must be runnable (the tests kill connections with it)");
    assert!(
        out.status.success(),
        "rabbitmqctl eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_kills_during_a_20k_run_lose_nothing() {
    let marker = unique("kill");
    let url = format!("{}?connection_name={marker}", url());
    let broker = Arc::new(RabbitBroker::connect(&url).await.unwrap());
    let topic = unique("killrun");
    let group = "workers";
    let handled = Tally::default();
    let shutdown = CancellationToken::new();
    let mut members = Vec::new();
    for _ in 0..4 {
        let handler = handled.handler();
        let consumer =
            Consumer::handler(SubscribeOptions::new(&topic, group).prefetch(100), handler)
                .concurrency(16);
        let running = consumer
            .start(broker.clone(), shutdown.clone())
            .await
            .unwrap();
        members.push(running);
    }
    let total = 20_000usize;
    let messages: Vec<Message> = (0..total)
        .map(|i| {
            let m = Message::new(format!("m{i}"));
            if i % 2 == 0 {
                m.with_key(format!("k{}", i % 50))
            } else {
                m
            }
        })
        .collect();
    let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
    let publisher = {
        let broker = broker.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            for chunk in messages.chunks(200) {
                // A batch cut by a connection kill fails loudly; send it again
                // (at-least-once: the handled set is checked, not the count).
                loop {
                    match broker.publish_batch(&topic, chunk.to_vec()).await {
                        Ok(_) => break,
                        Err(e) => {
                            assert!(e.is_transient(), "publish failed permanently: {e}");
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            failures
        })
    };
    let mut kills = 0;
    let mut killed_connections = 0;
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let done = handled.distinct();
        if done >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {total} messages handled after {kills} connection kills"
        );
        if kills < 3 && done >= (kills + 1) * total / 5 {
            killed_connections += kill_connections(&marker);
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publish_failures = publisher.await.unwrap();
    shutdown.cancel();
    for m in members {
        m.join().await.unwrap();
    }
    broker.close().await.unwrap();
    let (missing, again) = (handled.missing(&ids), handled.duplicates());
    assert_eq!(missing, 0, "{missing} messages never handled");
    assert_eq!(kills, 3);
    assert!(
        killed_connections >= 3,
        "the kills closed only {killed_connections} connections"
    );
    eprintln!(
        "20k run: {kills} kills closed {killed_connections} connections; {publish_failures} publish \
         batches retried; {again} messages handled more than once (redelivered after a kill)"
    );
    cleanup_groups(&topic, &[group], 8).await;
}

#[tokio::test]
async fn conflicting_queue_declaration_is_a_clear_error() {
    let broker = RabbitBroker::connect(&url()).await.unwrap();
    let topic = unique("conflict");
    let group = "g";
    let queue = format!("{topic}:{group}.p0");
    let conn = raw().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(5));
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let err = match broker.subscribe(SubscribeOptions::new(&topic, group)).await {
        Err(e) => e,
        Ok(_) => panic!("subscribing over a conflicting queue was accepted"),
    };
    assert!(!err.is_transient(), "{err}");
    let Error::Backend { source, .. } = &err else {
        panic!("unexpected error {err}");
    };
    let conflict = source
        .downcast_ref::<DeclareConflict>()
        .unwrap_or_else(|| panic!("source is not a DeclareConflict: {source}"));
    assert_eq!(conflict.kind, "queue");
    assert_eq!(conflict.name, queue);
    assert!(err.to_string().contains(&queue), "{err}");

    // An exchange of another type is named the same way, at publish time.
    let other = unique("fanout");
    ch.exchange_declare(
        other.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let err = broker.publish(&other, Message::new("x")).await.unwrap_err();
    assert!(
        err.to_string().contains("exchange") && err.to_string().contains(&other),
        "{err}"
    );
    // The broker handle still works after both refusals.
    let ok_topic = unique("fine");
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&ok_topic, "g"))
        .await
        .unwrap();
    broker
        .publish(&ok_topic, Message::new("still fine"))
        .await
        .unwrap();
    let d = sub.recv().await.unwrap().unwrap();
    d.ack().await.unwrap();
    sub.close().await.unwrap();
    broker.close().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .exchange_delete(other.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    cleanup_groups(&topic, &[group], 8).await;
    cleanup_groups(&ok_topic, &["g"], 8).await;
}

/// An exchange of another kind under a topic's name: subscribe and publish refuse it
/// with a `DeclareConflict` naming it, and once it is deleted the group's queues still
/// hold their messages and are bound again by the next subscribe.
#[tokio::test]
async fn an_exchange_of_another_kind_under_a_topics_name_is_refused_naming_it() {
    let conn = raw().await;
    let broker = RabbitBroker::connect(&url()).await.unwrap();
    let topic = unique("other-kind");
    // A group holding one message; then its exchange is swapped for a topic exchange.
    let sub = broker
        .subscribe(SubscribeOptions::new(&topic, "g"))
        .await
        .unwrap();
    sub.close().await.unwrap();
    broker
        .publish(&topic, Message::new("kept").with_key("k"))
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete(topic.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    ch.exchange_declare(
        topic.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let fresh = RabbitBroker::connect(&url()).await.unwrap();
    let subscribe_err = fresh
        .subscribe(SubscribeOptions::new(&topic, "g"))
        .await
        .err()
        .expect("subscribing through a topic exchange must fail");
    let publish_err = fresh.publish(&topic, Message::new("x")).await.unwrap_err();
    for err in [&subscribe_err, &publish_err] {
        let Error::Backend { source, .. } = err else {
            panic!("unexpected error {err}");
        };
        let conflict = source
            .downcast_ref::<DeclareConflict>()
            .unwrap_or_else(|| panic!("source is not a DeclareConflict: {source}"));
        assert_eq!(
            (conflict.kind, conflict.name.as_str()),
            ("exchange", topic.as_str())
        );
        assert!(!err.is_transient(), "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains("delete it") && shown.contains(&topic),
            "{shown}"
        );
    }
    // The fix: delete the exchange. The message waits in its partition.
    ch.exchange_delete(topic.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let mut sub = fresh
        .subscribe(SubscribeOptions::new(&topic, "g"))
        .await
        .unwrap();
    let d = sub.recv().await.unwrap().unwrap();
    assert_eq!(&d.message().payload[..], b"kept");
    d.ack().await.unwrap();
    fresh
        .publish(&topic, Message::new("after").with_key("k"))
        .await
        .unwrap();
    let d = sub.recv().await.unwrap().unwrap();
    assert_eq!(&d.message().payload[..], b"after");
    d.ack().await.unwrap();
    sub.close().await.unwrap();
    fresh.close().await.unwrap();
    broker.close().await.unwrap();
    cleanup_groups(&topic, &["g"], 8).await;
}

#[tokio::test]
async fn unroutable_publish_is_an_error() {
    let broker = RabbitBroker::connect(&url()).await.unwrap();
    let topic = unique("nobody");
    let err = broker
        .publish(&topic, Message::new("lost?"))
        .await
        .unwrap_err();
    let Error::Backend { source, .. } = &err else {
        panic!("unexpected error {err}");
    };
    let unroutable = source
        .downcast_ref::<Unroutable>()
        .unwrap_or_else(|| panic!("source is not Unroutable: {source}"));
    assert_eq!(unroutable.topic, topic);
    // Batches report it too.
    let err = broker
        .publish_batch(&topic, vec![Message::new("a"), Message::new("b")])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unroutable"), "{err}");
    broker.close().await.unwrap();
    cleanup_groups(&topic, &[], 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_cancels_consumers_and_leaves_nothing_unacked() {
    let broker = Arc::new(RabbitBroker::connect(&url()).await.unwrap());
    let topic = unique("graceful");
    let group = "g";
    let handled = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let handler = {
        let handled = handled.clone();
        move |_d: Delivery| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                handled.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        }
    };
    let running = Consumer::handler(SubscribeOptions::new(&topic, group).prefetch(50), handler)
        .concurrency(8)
        .members(2)
        .start(broker.clone(), shutdown.clone())
        .await
        .unwrap();
    let total = 2000;
    let messages: Vec<Message> = (0..total).map(|i| Message::new(format!("{i}"))).collect();
    broker.publish_batch(&topic, messages).await.unwrap();
    while handled.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    let report = running.join().await.unwrap();
    let conn = raw().await;
    let mut ready = 0;
    for p in 0..8 {
        let (messages, consumers) = queue_stats(&conn, &format!("{topic}:{group}.p{p}")).await;
        assert_eq!(consumers, 0, "partition {p} still has a consumer");
        ready += messages as usize;
    }
    let (_, members) = queue_stats(&conn, &format!("{topic}:{group}.members")).await;
    assert_eq!(members, 0, "the members left the group");
    // Every message is either acked (handled) or back in a queue, ready: none is held
    // unacked by a consumer that is gone, and none was lost.
    assert_eq!(report.acked as usize, handled.load(Ordering::SeqCst));
    assert_eq!(
        report.acked as usize + ready,
        total,
        "acked {} + ready {ready} != {total}",
        report.acked
    );
    assert!(ready > 0, "shutdown came after everything was handled");
    broker.close().await.unwrap();
    let _ = conn.close(200, "done".into()).await;
    cleanup_groups(&topic, &[group], 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_while_members_join_and_partitions_move() {
    let broker = Arc::new(RabbitBroker::connect(&url()).await.unwrap());
    let topic = unique("reorder");
    let group = "g";
    let keys = 40;
    let per_key = 60;
    let last: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let busy: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let start_member = |label: usize| {
        let (last, busy, violations, done) =
            (last.clone(), busy.clone(), violations.clone(), done.clone());
        let handler = move |d: Delivery| {
            let (last, busy, violations, done) =
                (last.clone(), busy.clone(), violations.clone(), done.clone());
            async move {
                let key = d.key().unwrap_or_default().to_string();
                let seq: i64 = std::str::from_utf8(d.payload()).unwrap().parse().unwrap();
                if !busy.lock().unwrap().insert(key.clone()) {
                    violations
                        .lock()
                        .unwrap()
                        .push(format!("{key} ran concurrently"));
                }
                tokio::time::sleep(Duration::from_millis(1 + (seq as u64 % 3))).await;
                {
                    let mut last = last.lock().unwrap();
                    let prev = last.get(&key).copied().unwrap_or(-1);
                    if seq != prev + 1 {
                        violations
                            .lock()
                            .unwrap()
                            .push(format!("{key}: {seq} after {prev} (member {label})"));
                    }
                    last.insert(key.clone(), seq);
                }
                busy.lock().unwrap().remove(&key);
                done.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        };
        Consumer::handler(SubscribeOptions::new(&topic, group).prefetch(32), handler)
            .concurrency(8)
            .start(broker.clone(), shutdown.clone())
    };
    let mut members = vec![start_member(0).await.unwrap()];
    let total = keys * per_key;
    let publisher = {
        let broker = broker.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for seq in 0..per_key {
                let batch: Vec<Message> = (0..keys)
                    .map(|k| Message::new(seq.to_string()).with_key(format!("k{k}")))
                    .collect();
                broker.publish_batch(&topic, batch).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Members join while messages flow, so partitions move from member to member.
    for label in 1..3 {
        while done.load(Ordering::SeqCst) < label * total / 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        members.push(start_member(label).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::SeqCst) < total {
        assert!(
            Instant::now() < deadline,
            "handled {} of {total}",
            done.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    publisher.await.unwrap();
    shutdown.cancel();
    let mut worked = 0;
    for m in members {
        let report = m.join().await.unwrap();
        if report.acked > 0 {
            worked += 1;
        }
    }
    broker.close().await.unwrap();
    let v = violations.lock().unwrap().clone();
    assert!(
        v.is_empty(),
        "{} violations, first: {:?}",
        v.len(),
        v.first()
    );
    assert!(worked >= 2, "only {worked} members did any work");
    cleanup_groups(&topic, &[group], 8).await;
}
