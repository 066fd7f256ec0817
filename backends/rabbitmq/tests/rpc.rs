//! Request/reply over direct reply-to, beyond the conformance scenarios: the wire format
//! a foreign AMQP RPC client or server speaks (RabbitMQ's RPC pattern: `reply_to` and
//! `correlation_id` properties, replies through the default exchange), a forged reply
//! address refused, and a lost connection ending pending requests with a typed error.
//!
//! Against the local broker (127.0.0.1:5672, guest/guest; `SWITCHYARD_AMQP_URL`
//! overrides); the connection-loss test drives `rabbitmqctl` and closes only its own
//! connections (picked by their connection name). Fails, never skips, when either is
//! missing.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ExchangeKind};
use switchyard_core::rpc::headers;
use switchyard_core::{
    reply_fn, Broker, CancellationToken, Consumer, Delivery, Error, HandlerError, Message,
    RunningConsumer, SubscribeOptions, Subscriber,
};
use switchyard_rabbitmq::RabbitBroker;

use common::{cleanup, cleanup_groups, raw, unique, url};

/// Long enough for a busy machine; only a hang reaches it.
const LONG: Duration = Duration::from_secs(60);

async fn connect(connection_name: &str) -> Arc<RabbitBroker> {
    let sep = if url().contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}connection_name={connection_name}", url());
    Arc::new(
        RabbitBroker::connect(&url)
            .await
            .expect("RabbitMQ must be reachable at SWITCHYARD_AMQP_URL"),
    )
}

async fn echo(d: Delivery) -> Result<String, HandlerError> {
    Ok(format!("re:{}", String::from_utf8_lossy(d.payload())))
}

/// A responder on queue `topic` answering `re:<payload>`.
async fn responder(
    broker: &Arc<RabbitBroker>,
    topic: &str,
) -> (RunningConsumer, CancellationToken) {
    let stop = CancellationToken::new();
    let running = Consumer::new(
        SubscribeOptions::queue(topic),
        reply_fn(broker.clone(), echo),
    )
    .concurrency(16)
    .start(broker.clone(), stop.clone())
    .await
    .expect("start the responder");
    (running, stop)
}

/// A queue of the raw connection bound to every slot of exchange `topic`: what a
/// foreign client reads a whole topic through (see the crate's wire format).
async fn bind_every_slot(ch: &Channel, topic: &str, queue: &str) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for slot in 0..1024 {
        ch.queue_bind(
            queue.into(),
            topic.into(),
            slot.to_string().as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_rpc_server_answers_through_reply_to_and_correlation_id() {
    let broker = connect(&unique("rpc-foreign-server")).await;
    let topic = unique("rpc-fs");
    let conn = raw().await;
    let ch = conn.create_channel().await.unwrap();
    // The exchange exists once a request was sent; declare it as switchyard does.
    ch.exchange_declare(
        topic.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let queue = format!("{topic}-server");
    bind_every_slot(&ch, &topic, &queue).await;
    let mut requests = ch
        .basic_consume(
            queue.as_str().into(),
            "server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // RabbitMQ's RPC pattern, server side: answer to reply_to through the default
    // exchange, echoing correlation_id; nothing switchyard-specific.
    let server = tokio::spawn(async move {
        let d = requests.next().await.unwrap().unwrap();
        let reply_to = d.properties.reply_to().clone().expect("reply_to is set");
        let correlation = d
            .properties
            .correlation_id()
            .clone()
            .expect("correlation_id");
        let body = format!("fib={}", String::from_utf8_lossy(&d.data));
        ch.basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_correlation_id(correlation),
        )
        .await
        .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        (reply_to.to_string(), d.properties.headers().clone())
    });
    let reply = broker
        .request(&topic, Message::new("30"), LONG)
        .await
        .expect("the foreign server's reply");
    assert_eq!(reply.payload.as_ref(), b"fib=30");
    assert!(reply.headers.contains_key(headers::CORRELATION_ID));
    let (reply_to, table) = server.await.unwrap();
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to."),
        "the broker names the requesting channel: {reply_to}"
    );
    let table = table.unwrap_or_default();
    assert!(
        !table.contains_key(headers::REPLY_TO) && !table.contains_key(headers::CORRELATION_ID),
        "reply address and correlation id travel as properties only: {table:?}"
    );
    broker.close().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    cleanup_groups(&topic, &[], 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_rpc_client_with_an_exclusive_reply_queue_gets_the_answer() {
    let broker = connect(&unique("rpc-foreign-client")).await;
    let topic = unique("rpc-fc");
    let (running, stop) = responder(&broker, &topic).await;
    let conn = raw().await;
    let ch = conn.create_channel().await.unwrap();
    // RabbitMQ's RPC pattern, client side: a server-named exclusive reply queue.
    let callback = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut replies = ch
        .basic_consume(
            callback.name().clone(),
            "client".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.basic_publish(
        topic.as_str().into(),
        "0".into(),
        BasicPublishOptions::default(),
        b"ping",
        BasicProperties::default()
            .with_reply_to(callback.name().clone())
            .with_correlation_id("corr-42".into()),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(LONG, replies.next())
        .await
        .expect("no reply came")
        .unwrap()
        .unwrap();
    assert_eq!(reply.data, b"re:ping");
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("corr-42")
    );
    stop.cancel();
    let report = running.join().await.unwrap();
    assert_eq!(report.acked, 1, "{report:?}");
    broker.close().await.unwrap();
    cleanup(&conn, &topic, &topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_address_the_broker_did_not_name_is_refused() {
    let broker = connect(&unique("rpc-forged")).await;
    for address in ["orders", "orders:billing.p0", ""] {
        let e = broker
            .send_reply(address, Message::new("forged"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{address:?}: {e}");
    }
    broker.close().await.unwrap();
}

/// Closes the broker connections whose name starts with `prefix` (`rabbitmqctl eval`,
/// as `close_connection` takes one at a time); returns how many.
fn close_connections_named(prefix: &str) -> usize {
    let expr = format!(
        r#"Prefix = <<"{prefix}">>,
        Name = fun(Props) -> case lists:keyfind(<<"connection_name">>, 1, Props) of
            {{_, longstr, N}} -> N; _ -> <<>> end end,
        Pids = [proplists:get_value(pid, I)
                || I <- rabbit_networking:connection_info_all([pid, client_properties]),
                   string:prefix(Name(proplists:get_value(client_properties, I)), Prefix)
                       =/= nomatch],
        [rabbit_networking:close_connection(P, "switchyard rpc loss test") || P <- Pids],
        length(Pids)."#
    );
    let out = Command::new("rabbitmqctl")
        .args(["-q", "eval", &expr])
        .output()
        .expect("rabbitmqctl must be runnable (the test closes connections with it)");
    assert!(
        out.status.success(),
        "rabbitmqctl eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    text.parse()
        .unwrap_or_else(|_| panic!("unexpected rabbitmqctl eval output {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_ends_pending_requests_and_the_next_request_reconnects() {
    let name = unique("rpc-loss");
    let broker = connect(&name).await;
    let topic = unique("rpc-loss");
    // A reader that never answers, so the requests are published and then wait.
    let mut silent = broker
        .subscribe(SubscribeOptions::queue(&topic))
        .await
        .unwrap();
    let pending: Vec<_> = (0..10)
        .map(|i| {
            let (broker, topic) = (broker.clone(), topic.clone());
            tokio::spawn(async move {
                broker
                    .request(&topic, Message::new(format!("q{i}")), LONG * 10)
                    .await
            })
        })
        .collect();
    for _ in 0..pending.len() {
        let d = tokio::time::timeout(LONG, silent.recv())
            .await
            .expect("the requests reach the reader")
            .unwrap()
            .unwrap();
        d.ack().await.unwrap();
    }
    silent.close().await.unwrap();
    assert_eq!(close_connections_named(&format!("{name} rpc")), 1);
    for (i, task) in pending.into_iter().enumerate() {
        // The requests wait ten minutes for their reply; only the loss can end them now.
        let result = tokio::time::timeout(LONG, task)
            .await
            .unwrap_or_else(|_| panic!("request {i} hung after its connection was lost"))
            .unwrap();
        match result {
            Err(e @ Error::Backend { .. }) => assert!(e.is_transient(), "request {i}: {e}"),
            other => panic!("request {i} ended with {other:?}, expected a transient backend error"),
        }
    }
    // The next request opens a new reply channel and is answered.
    let (running, stop) = responder(&broker, &topic).await;
    let reply = broker
        .request(&topic, Message::new("again"), LONG)
        .await
        .expect("a request after the loss");
    assert_eq!(reply.payload.as_ref(), b"re:again");
    stop.cancel();
    running.join().await.unwrap();
    broker.close().await.unwrap();
    cleanup(&raw().await, &topic, &topic).await;
}
