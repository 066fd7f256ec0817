//! Request/reply on Kafka against a real broker: each client's replies land on its own
//! reply topic (and nowhere else), a named reply topic is reused by the next run, a
//! reply to a topic that does not exist is a permanent error that creates nothing,
//! and a client that is not switchyard can answer a request from its headers alone.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use switchyard_core::rpc::headers;
use switchyard_core::{
    reply_fn, Broker, Consumer, Delivery, Error, HandlerError, Message, SubscribeOptions,
    Subscriber,
};
use switchyard_kafka::KafkaBroker;
use tokio_util::sync::CancellationToken;

mod common;
use common::{name, recv_n, url};

/// How long any wait may take before the test fails (a hang guard, not a timing
/// assertion).
const LONG: Duration = Duration::from_secs(60);

fn broker() -> KafkaBroker {
    KafkaBroker::connect(&url("")).expect("connect")
}

async fn echo(d: Delivery) -> Result<String, HandlerError> {
    Ok(format!("re:{}", String::from_utf8_lossy(d.payload())))
}

/// Starts an echoing responder on `topic` through its own client.
fn responder(topic: &str) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let broker: Arc<dyn Broker> = Arc::new(broker());
    let consumer = Consumer::new(
        SubscribeOptions::queue(topic),
        reply_fn(broker.clone(), echo),
    )
    .concurrency(32);
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let token = token.clone();
        async move {
            consumer.run(broker, token).await.expect("responder");
        }
    });
    (token, task)
}

/// Records held by `topic`, as another client sees them; `None` if it does not exist.
async fn records(observer: &KafkaBroker, topic: &str) -> Option<u64> {
    observer
        .topics()
        .await
        .expect("list topics")
        .into_iter()
        .find(|t| t.name == topic)
        .map(|t| t.messages.unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replies_reach_the_requesting_client_only() {
    let topic = name("rpc-two");
    let (token, task) = responder(&topic);
    let (a, b) = (broker(), broker());
    let ask = |client: &KafkaBroker, who: &'static str, n: usize| {
        let client = client.clone();
        let topic = topic.clone();
        async move {
            let asks = (0..n).map(|i| {
                let (client, topic) = (client.clone(), topic.clone());
                async move {
                    let reply = client
                        .request(&topic, Message::new(format!("{who}{i}")), LONG)
                        .await
                        .unwrap_or_else(|e| panic!("{who} request {i}: {e}"));
                    assert_eq!(reply.payload, format!("re:{who}{i}").as_bytes());
                }
            });
            futures::future::join_all(asks).await;
        }
    };
    tokio::join!(ask(&a, "a", 40), ask(&b, "b", 25));
    let (ta, tb) = (a.reply_topic(), b.reply_topic());
    let (ta, tb) = (ta.expect("a's reply topic"), tb.expect("b's reply topic"));
    assert_ne!(ta, tb, "two clients share a reply topic");
    // Each topic holds its own client's replies and no other's.
    let observer = broker();
    assert_eq!(records(&observer, &ta).await, Some(40));
    assert_eq!(records(&observer, &tb).await, Some(25));
    token.cancel();
    task.await.expect("responder task");
    a.close().await.expect("close a");
    b.close().await.expect("close b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_client_reuses_its_named_reply_topic() {
    let topic = name("rpc-reuse");
    let (token, task) = responder(&topic);
    let stable = format!("sy.reply.{}", name("worker-1"));
    let observer = broker();
    for run in ["first", "second"] {
        let client = broker();
        client.set_reply_topic(&stable).expect("set reply topic");
        let reply = client
            .request(&topic, Message::new(run), LONG)
            .await
            .unwrap_or_else(|e| panic!("{run} run: {e}"));
        // The second run reads from the topic's end: the first run's reply is not
        // handed to it (it would not match anyway, but would be read needlessly).
        assert_eq!(reply.payload, format!("re:{run}").as_bytes());
        assert_eq!(client.reply_topic().as_deref(), Some(stable.as_str()));
        client.close().await.expect("close");
    }
    assert_eq!(
        records(&observer, &stable).await,
        Some(2),
        "one topic, reused"
    );
    token.cancel();
    task.await.expect("responder task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reply_to_a_missing_topic_fails_permanently_and_creates_nothing() {
    let client = broker();
    let gone = format!("sy.reply.{}", name("gone"));
    let sent = tokio::time::timeout(LONG, client.send_reply(&gone, Message::new("late")))
        .await
        .expect("a reply to a missing topic hung");
    match sent {
        Err(e @ Error::Backend { .. }) => assert!(!e.is_transient(), "{e}"),
        other => panic!("expected a permanent backend error, got {other:?}"),
    }
    assert_eq!(
        records(&client, &gone).await,
        None,
        "the reply created its topic"
    );
}

#[tokio::test]
async fn only_reply_topics_are_reply_addresses() {
    let client = broker();
    let refused = client.send_reply("orders", Message::new("x")).await;
    assert!(
        matches!(&refused, Err(Error::Config { .. })),
        "a reply into an application topic was not refused: {refused:?}"
    );
    let named = client.set_reply_topic("orders");
    assert!(matches!(named, Err(Error::Config { .. })), "{named:?}");
    client
        .set_reply_topic("sy.reply.a")
        .expect("a reply topic name");
    let renamed = client.set_reply_topic("sy.reply.b");
    assert!(matches!(renamed, Err(Error::Config { .. })), "{renamed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_client_answers_from_the_record_headers() {
    let topic = name("rpc-foreign");
    let client = broker();
    // The request topic, read here only to find the request's headers.
    let mut sub = client
        .subscribe(SubscribeOptions::queue(&topic))
        .await
        .expect("subscribe");
    let asking = {
        let (client, topic) = (client.clone(), topic.clone());
        tokio::spawn(async move { client.request(&topic, Message::new("ping"), LONG).await })
    };
    let request = recv_n(&mut sub, 1).await.remove(0);
    let to = request.message().headers[headers::REPLY_TO].clone();
    let correlation = request.message().headers[headers::CORRELATION_ID].clone();
    assert!(to.starts_with("sy.reply."), "reply address {to:?}");
    // A plain Kafka producer: the payload, the correlation id header, partition 0.
    let servers = client.config().bootstrap_servers.clone();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()
        .expect("raw producer");
    producer
        .send(
            FutureRecord::<str, str>::to(&to)
                .partition(0)
                .payload("pong")
                .headers(OwnedHeaders::new().insert(Header {
                    key: headers::CORRELATION_ID,
                    value: Some(correlation.as_bytes()),
                })),
            LONG,
        )
        .await
        .expect("raw reply");
    request.ack().await.expect("ack");
    let reply = tokio::time::timeout(LONG, asking)
        .await
        .expect("no reply")
        .expect("task")
        .expect("request");
    assert_eq!(reply.payload.as_ref(), b"pong");
    sub.close().await.expect("close subscription");
    client.close().await.expect("close");
}
