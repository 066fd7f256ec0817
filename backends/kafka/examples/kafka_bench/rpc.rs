//! The request/reply pair: `Broker::request` to a `reply_fn` responder and back, against
//! raw rdkafka doing the same round trips.
//!
//! Both sides: a requester client and a responder client, K requests in flight, N in
//! all, 256-byte payloads, producers with the same settings (acks=all, idempotence,
//! linger.ms=5; switchyard's replies go out without idempotence, see
//! `src/rpc.rs`). A request goes to an 8-partition topic with a reply-topic and a
//! correlation-id header; the responder, one member of a group, produces the reply to
//! partition 0 of the reply topic, awaits its acknowledgement, then marks the request
//! done (switchyard: ack, committed periodically; raw: offset stored, auto-committed).
//! The requester reads its reply topic by assignment and matches replies through a map
//! of correlation ids. Group joins and connections are warmed up outside the timing; R
//! rounds alternate the order of the sides, and the medians are printed as
//! `pair=kafka-rpc switchyard=<req/s> raw=<req/s> ratio=<r>`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use switchyard_core::rpc::headers::{CORRELATION_ID, REPLY_TO};
use switchyard_core::{
    reply_fn, Broker, Bytes, CancellationToken, Consumer, Delivery, HandlerError, Message,
    RunningConsumer, SubscribeOptions,
};
use switchyard_kafka::headers;
use switchyard_kafka::KafkaBroker;
use tokio::sync::oneshot;

const PAYLOAD: usize = 256;
const TIMEOUT: Duration = Duration::from_secs(30);

async fn echo(d: Delivery) -> Result<Bytes, HandlerError> {
    Ok(d.message().payload.clone())
}

/// The switchyard side: a requester client and a running responder.
struct Switchyard {
    requester: Arc<KafkaBroker>,
    responder: Arc<KafkaBroker>,
    running: RunningConsumer,
    token: CancellationToken,
    topic: String,
}

impl Switchyard {
    async fn start(url: &str, topic: String, in_flight: usize) -> Self {
        let requester = Arc::new(KafkaBroker::connect(url).expect("connect"));
        let responder = Arc::new(KafkaBroker::connect(url).expect("connect"));
        let as_broker: Arc<dyn Broker> = responder.clone();
        let token = CancellationToken::new();
        let running = Consumer::new(
            SubscribeOptions::new(&topic, "g"),
            reply_fn(as_broker.clone(), echo),
        )
        .concurrency(in_flight)
        .start(as_broker, token.clone())
        .await
        .expect("start the responder");
        let side = Self {
            requester,
            responder,
            running,
            token,
            topic,
        };
        // The reply topic, its reader and the producers' connections, outside the timing.
        side.round(in_flight, in_flight).await;
        side
    }

    async fn round(&self, n: usize, in_flight: usize) -> f64 {
        let payload = Bytes::from(vec![b'x'; PAYLOAD]);
        let start = Instant::now();
        let answered = futures::stream::iter(0..n)
            .map(|_| {
                let (requester, payload) = (self.requester.clone(), payload.clone());
                async move {
                    let reply = requester.request(&self.topic, Message::new(payload), TIMEOUT);
                    reply.await.expect("a reply").payload.len()
                }
            })
            .buffer_unordered(in_flight)
            .fold(0, |n, len| async move { n + usize::from(len == PAYLOAD) })
            .await;
        assert_eq!(answered, n, "every reply carries its request's payload");
        n as f64 / start.elapsed().as_secs_f64()
    }

    async fn stop(self) {
        self.token.cancel();
        self.running.join().await.expect("stop the responder");
        let _ = self.requester.close().await;
        let _ = self.responder.close().await;
    }
}

/// Waiting requests of the raw side, by correlation id.
type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<usize>>>>;

/// The raw side: a producer and an assigned reply reader, and a responder task.
struct Raw {
    producer: FutureProducer,
    waiting: Waiting,
    topic: String,
    reply_topic: String,
    stop: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<()>,
    responder: tokio::task::JoinHandle<()>,
}

/// The raw clients' base settings: the servers and the URL's librdkafka pass-through
/// settings (`fetch.wait.max.ms=…`, say), as switchyard's clients get them.
fn base(broker: &KafkaBroker) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &broker.config().bootstrap_servers);
    for (k, v) in &broker.config().client {
        c.set(k, v);
    }
    c
}

fn producer(base: &ClientConfig) -> FutureProducer {
    base.clone()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("raw producer")
}

fn header<'a>(m: &'a rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

/// Answers each request as switchyard's responder does: reply produced and
/// acknowledged, then the request's offset stored for the next commit.
async fn raw_responder(base: ClientConfig, topic: String, stop: Arc<AtomicBool>) {
    let consumer: Arc<StreamConsumer> = Arc::new(
        base.clone()
            .set("group.id", "g")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("raw responder"),
    );
    consumer.subscribe(&[&topic]).expect("subscribe");
    let producer = producer(&base);
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        else {
            continue;
        };
        let (Some(to), Some(correlation)) = (header(&m, REPLY_TO), header(&m, CORRELATION_ID))
        else {
            continue;
        };
        let to = String::from_utf8_lossy(to).into_owned();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: headers::ID,
                value: Some(uuid::Uuid::now_v7().to_string().as_bytes()),
            })
            .insert(Header {
                key: CORRELATION_ID,
                value: Some(correlation),
            });
        let record = FutureRecord::<str, [u8]>::to(&to)
            .partition(0)
            .payload(m.payload().unwrap_or_default())
            .headers(headers);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .expect("send");
        let (consumer, topic, partition, offset) =
            (consumer.clone(), topic.clone(), m.partition(), m.offset());
        tokio::spawn(async move {
            delivery.await.expect("delivery").expect("acknowledged");
            let _ = consumer.store_offset(&topic, partition, offset);
        });
    }
}

impl Raw {
    async fn start(
        broker: &KafkaBroker,
        topic: String,
        reply_topic: String,
        in_flight: usize,
    ) -> Self {
        let base = base(broker);
        broker.ensure_topic(&topic).await.expect("topic");
        broker.ensure_topic(&reply_topic).await.expect("topic");
        let stop = Arc::new(AtomicBool::new(false));
        let responder = tokio::spawn(raw_responder(base.clone(), topic.clone(), stop.clone()));
        let waiting: Waiting = Arc::default();
        let reader: BaseConsumer = base
            .clone()
            .set("group.id", &reply_topic)
            .set("enable.auto.commit", "false")
            .create()
            .expect("raw reply reader");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&reply_topic, 0, Offset::Beginning)
            .expect("partition");
        reader.assign(&tpl).expect("assign");
        let reader = {
            let (waiting, stop) = (waiting.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let Some(correlation) = header(&m, CORRELATION_ID) else {
                        continue;
                    };
                    let key = String::from_utf8_lossy(correlation);
                    if let Some(tx) = waiting.lock().unwrap().remove(key.as_ref()) {
                        let _ = tx.send(m.payload().map_or(0, <[u8]>::len));
                    }
                }
            })
        };
        let side = Self {
            producer: producer(&base),
            waiting,
            topic,
            reply_topic,
            stop,
            reader,
            responder,
        };
        side.round(in_flight, in_flight).await;
        side
    }

    async fn ask(&self, payload: &[u8]) -> usize {
        let correlation = uuid::Uuid::now_v7().to_string();
        let id = uuid::Uuid::now_v7().to_string();
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(correlation.clone(), tx);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: headers::ID,
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: REPLY_TO,
                value: Some(self.reply_topic.as_bytes()),
            })
            .insert(Header {
                key: CORRELATION_ID,
                value: Some(correlation.as_bytes()),
            });
        let record = FutureRecord::<str, [u8]>::to(&self.topic)
            .payload(payload)
            .headers(headers);
        self.producer
            .send(record, TIMEOUT)
            .await
            .map_err(|(e, _)| e)
            .expect("request acknowledged");
        tokio::time::timeout(TIMEOUT, rx)
            .await
            .expect("a raw reply in time")
            .expect("reply")
    }

    async fn round(&self, n: usize, in_flight: usize) -> f64 {
        let payload = vec![b'x'; PAYLOAD];
        let start = Instant::now();
        let answered = futures::stream::iter(0..n)
            .map(|_| self.ask(&payload))
            .buffer_unordered(in_flight)
            .fold(0, |n, len| async move { n + usize::from(len == PAYLOAD) })
            .await;
        assert_eq!(answered, n, "every raw reply carries its request's payload");
        n as f64 / start.elapsed().as_secs_f64()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.responder.await;
        let _ = tokio::task::spawn_blocking(move || self.reader.join()).await;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the pair: `n` round trips per round, `in_flight` at once, `rounds` rounds.
pub(crate) async fn pair(url: &str, run: &str, n: usize, in_flight: usize, rounds: usize) {
    eprintln!(
        "bench: rpc, {n} round trips of {PAYLOAD} bytes, {in_flight} in flight, {rounds} rounds"
    );
    // The raw side takes its settings from here: the same URL.
    let admin = KafkaBroker::connect(url).expect("connect");
    let sy = Switchyard::start(url, format!("bench-rpc-sy-{run}"), in_flight).await;
    let raw = Raw::start(
        &admin,
        format!("bench-rpc-raw-{run}"),
        format!("bench-rpc-raw-reply-{run}"),
        in_flight,
    )
    .await;
    let (mut s, mut r) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            s.push(sy.round(n, in_flight).await);
            r.push(raw.round(n, in_flight).await);
        } else {
            r.push(raw.round(n, in_flight).await);
            s.push(sy.round(n, in_flight).await);
        }
        eprintln!(
            "bench: rpc round {round}: switchyard={:.0} raw={:.0}",
            s[round], r[round]
        );
    }
    sy.stop().await;
    raw.stop().await;
    let _ = admin.close().await;
    crate::print("kafka-rpc", median(s), median(r));
}
