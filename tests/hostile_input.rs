//! Malformed foreign messages on each backend: what pika (`tests/foreign/hostile_amqp.py`)
//! and confluent-kafka (`tests/foreign/hostile_kafka.py`) can write that switchyard
//! would never write itself — out-of-range timestamps, missing / empty / shared / 3 KB
//! ids, headers up to the broker's limit, header values that are not UTF-8 or not
//! strings, forged reserved, retry and dead-letter headers, empty and near-limit bodies
//! — then well-formed messages with one key, from the script and from switchyard.
//!
//! Each runs through the real consumer runtime with a `DeadLetterLayer`, once plain and
//! once with `RetryTiers` (so forged retry headers meet the layer that reads them). The
//! handler decodes a JSON body `{"marker": ..}`: a body that decodes is data (acked), any
//! other fails with a decode error and must be dead-lettered with that reason. Asserted:
//! every malformed message ends as the script says (data or dead letter), none stalls
//! the key behind it, the well-formed ones arrive once each in publish order, the
//! consumers report no error, no panic and no nack.
//!
//! The memory backend is not covered: it has no foreign clients, and a `Message` built
//! in Rust cannot hold these shapes.
//!
//! Against the test brokers (`SWITCHYARD_AMQP_URL`, `SWITCHYARD_KAFKA_URL`); fails,
//! never skips, when a broker or python3 with pika / confluent-kafka is missing
//! (`scripts/brokers.sh` `ensure_python_clients` installs them). RabbitMQ objects are
//! deleted at the end, also on failure.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::middleware::dead_letter::DeadLetterAdmin;
use switchyard::middleware::retry_tiers::{RetryTiers, RetryTiersLayer};
use switchyard::middleware::DeadLetterLayer;
use switchyard::{
    handler_fn, AnyBroker, App, CancellationToken, Codec, Consumer, Delivery, FailureKind,
    HandlerError, Headers, JsonCodec, Message, SubscribeOptions,
};
use tower::ServiceBuilder;

/// How long all messages of one run may take to arrive.
const WAIT: Duration = Duration::from_secs(60);
/// The retry tier's delay, also the longest a forged due time may hold a handler.
const TIER_DELAY: Duration = Duration::from_millis(300);
/// Well-formed messages from the script, then from switchyard.
const FROM_SCRIPT: usize = 5;
const FROM_SWITCHYARD: usize = 5;
const KEY: &str = "hostile-key";

fn amqp_url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn kafka_url() -> String {
    std::env::var("SWITCHYARD_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
}

fn bootstrap() -> String {
    let url = kafka_url();
    let rest = url.trim_start_matches("kafka://");
    rest.split('?').next().unwrap().to_string()
}

fn script(name: &str) -> String {
    format!("{}/tests/foreign/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn name(label: &str) -> String {
    switchyard_conformance::support::unique_name(&format!("sy-hostile-{label}"))
}

/// Runs a helper script; panics with its output unless it succeeds.
fn python(args: &[&str]) -> String {
    let out = Command::new("python3")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 must be runnable (with pika and confluent-kafka): {e}")
        });
    assert!(
        out.status.success(),
        "python3 {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What the script says became of one message.
#[derive(Debug, serde::Deserialize)]
struct Sent {
    marker: String,
    /// `data`, `dead` or `retried` (fails once, then succeeds through the tier).
    expect: String,
    seq: Option<u64>,
}

fn parse_sent(out: &str) -> Vec<Sent> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// The body the handler decodes.
#[derive(serde::Deserialize)]
struct Body {
    #[allow(dead_code)] // only its presence (a string) is required
    marker: String,
    seq: Option<u64>,
    #[serde(default)]
    fail_once: bool,
}

/// One run of the handler.
#[derive(Clone, Debug)]
struct Seen {
    marker: String,
    /// The body decoded (else the handler failed with a decode error).
    decoded: bool,
    /// The handler failed on purpose (`fail_once`).
    failed: bool,
    seq: Option<u64>,
    attempt: u32,
    key: Option<String>,
    id: String,
    headers: Headers,
}

/// The marker of a message: its `marker` header, else its JSON body's, else its body
/// up to the first `|`.
fn marker_of(m: &Message) -> String {
    if let Some(v) = m.headers.get("marker") {
        return v.clone();
    }
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice(&m.payload) {
        if let Some(serde_json::Value::String(s)) = o.get("marker") {
            return s.clone();
        }
    }
    let end = m
        .payload
        .iter()
        .position(|&b| b == b'|')
        .unwrap_or(m.payload.len());
    String::from_utf8_lossy(&m.payload[..end]).into_owned()
}

type Log = Arc<Mutex<Vec<Seen>>>;

async fn handle(log: Log, d: Delivery) -> Result<(), HandlerError> {
    let m = d.message();
    let decoded = JsonCodec.decode::<Body>(&m.payload);
    let marker = marker_of(m);
    let mut seen = Seen {
        marker: marker.clone(),
        decoded: decoded.is_ok(),
        failed: false,
        seq: decoded.as_ref().ok().and_then(|b| b.seq),
        attempt: d.delivery_count(),
        key: m.key.clone(),
        id: m.id.clone(),
        // A near-limit header is not worth keeping.
        headers: m
            .headers
            .iter()
            .filter(|(k, _)| k.as_str() != "filler")
            .map(|(k, v)| (k.clone(), v.chars().take(200).collect()))
            .collect(),
    };
    let body = match decoded {
        Ok(body) => body,
        Err(e) => {
            log.lock().unwrap().push(seen);
            return Err(e.into());
        }
    };
    let mut log = log.lock().unwrap();
    if body.fail_once && !log.iter().any(|s| s.marker == marker) {
        seen.failed = true;
        log.push(seen);
        return Err(HandlerError::transient(std::io::Error::other("fails once")));
    }
    log.push(seen);
    Ok(())
}

/// Whether everything the script sent has ended as it says, and the well-formed
/// messages switchyard sent have arrived; else what is missing.
fn missing(sent: &[Sent], log: &[Seen]) -> Vec<String> {
    let mut missing = Vec::new();
    for s in sent {
        let runs: Vec<&Seen> = log.iter().filter(|l| l.marker == s.marker).collect();
        let done = match s.expect.as_str() {
            "data" => runs.iter().any(|r| r.decoded && !r.failed),
            "dead" => runs.iter().any(|r| !r.decoded),
            "retried" => runs.iter().any(|r| r.failed) && runs.iter().any(|r| !r.failed),
            other => panic!("unknown expectation {other}"),
        };
        if !done {
            missing.push(format!("{} ({})", s.marker, s.expect));
        }
    }
    missing
}

/// One backend, one stack: subscribe (or have the script wait for the group), let the
/// script write, add switchyard's own well-formed messages, wait, then check.
async fn run(broker: AnyBroker, topic: &str, group: &str, tiers: bool, write: WriteFn) {
    let only_frame_dead = matches!(
        write,
        WriteFn::Rabbit {
            frame_dead: true,
            ..
        }
    );
    let dlq = format!("{topic}.dlq");
    let letters = DeadLetterAdmin::new(broker.clone()).idle(Duration::from_millis(1500));
    let native = broker.capabilities().delayed_delivery;
    // RabbitMQ keeps dead letters only for groups that exist.
    if native {
        letters
            .prepare(&dlq)
            .await
            .expect("prepare the dead-letter group");
    }
    let log: Log = Arc::default();
    let handler = {
        let log = log.clone();
        handler_fn(move |d: Delivery| handle(log.clone(), d))
    };
    let options = SubscribeOptions::new(topic, group);
    let token = CancellationToken::new();
    let (sent, running) = if tiers {
        let tiers = RetryTiers::new(broker.clone(), [TIER_DELAY]).unwrap();
        let service = ServiceBuilder::new()
            .layer(DeadLetterLayer::new(broker.clone()))
            .layer(RetryTiersLayer::new(tiers.clone()))
            .service(handler);
        let app = tiers.add_consumers(App::new(broker.clone()), options, service);
        write.run(app, token.clone(), Some(&tiers)).await
    } else {
        let service = ServiceBuilder::new()
            .layer(DeadLetterLayer::new(broker.clone()))
            .service(handler);
        let app = App::new(broker.clone()).consumer(Consumer::new(options, service));
        write.run(app, token.clone(), None).await
    };
    let mut sent = sent;
    let first_seq = sent.iter().filter(|s| s.seq.is_some()).count() as u64;
    for i in 0..FROM_SWITCHYARD as u64 {
        let seq = first_seq + i;
        let marker = format!("well-{seq}");
        let body = serde_json::json!({ "marker": marker, "seq": seq }).to_string();
        broker
            .publish(topic, Message::new(body).with_key(KEY))
            .await
            .expect("switchyard publishes a well-formed message");
        sent.push(Sent {
            marker,
            expect: "data".into(),
            seq: Some(seq),
        });
    }

    let waited = tokio::time::timeout(WAIT, async {
        loop {
            if missing(&sent, &log.lock().unwrap()).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    token.cancel();
    let reports = running.join().await;
    let log = log.lock().unwrap().clone();
    let summary = |log: &[Seen]| -> Vec<String> {
        log.iter()
            .map(|s| {
                format!(
                    "{}:{}{}#{}",
                    s.marker,
                    if s.decoded { "ok" } else { "decode-failed" },
                    if s.failed { "(failed)" } else { "" },
                    s.attempt
                )
            })
            .collect()
    };
    assert!(
        waited.is_ok(),
        "stalled: after {WAIT:?} still missing {:?}; handler saw {:?}; reports {reports:?}",
        missing(&sent, &log),
        summary(&log)
    );
    let reports = reports.expect("the consumers stop without an error");
    for r in &reports {
        assert_eq!(r.panics, 0, "no handler panicked: {r:?}");
        // Data is acked, decode failures are dead-lettered (then acked), the one
        // transient failure goes to the tier (then acked): nothing is nacked, which
        // would mean a dead letter or retry could not be sent.
        assert_eq!(
            r.nacked,
            0,
            "nothing nacked: {r:?}; saw {:?}",
            summary(&log)
        );
    }

    // Each message once (a duplicate would be a redelivery nobody asked for), except
    // the one that fails once on purpose.
    let mut runs: HashMap<&str, usize> = HashMap::new();
    for s in &log {
        *runs.entry(s.marker.as_str()).or_default() += 1;
    }
    for s in &sent {
        let want = if s.expect == "retried" { 2 } else { 1 };
        assert_eq!(
            runs.get(s.marker.as_str()).copied().unwrap_or(0),
            want,
            "{} handled {want} time(s): {:?}",
            s.marker,
            summary(&log)
        );
    }

    // The well-formed ones in publish order, key intact.
    let wells: Vec<u64> = log
        .iter()
        .filter(|s| s.marker.starts_with("well-") && s.decoded)
        .map(|s| s.seq.unwrap())
        .collect();
    let want: Vec<u64> = (0..(FROM_SCRIPT + FROM_SWITCHYARD) as u64).collect();
    assert_eq!(wells, want, "well-formed ones in publish order");
    for s in log.iter().filter(|s| s.marker.starts_with("well-")) {
        assert_eq!(s.key.as_deref(), Some(KEY), "{s:?}");
    }

    // Reserved names never surface as headers, forged or not.
    for s in &log {
        for reserved in ["switchyard-id", "Switchyard-Id", "x-switchyard-key"] {
            assert!(
                !s.headers.contains_key(reserved),
                "{reserved} surfaced on {}: {:?}",
                s.marker,
                s.headers
            );
        }
        assert!(!s.id.is_empty(), "an id for {}", s.marker);
    }
    let by_marker = |m: &str| log.iter().find(|s| s.marker == m).cloned();
    // Ids: a forged id header is not the id; the shared id is kept for both where the
    // backend takes ids from the client (both messages still handled, checked above).
    if only_frame_dead {
        return check_dead_letters(&letters, topic, group, &sent).await;
    }
    let forged = by_marker("forged").expect("forged was handled");
    if native {
        // The id travels in message_id: a switchyard-id header is only a forgery.
        assert_ne!(
            forged.id, "forged-id",
            "a forged switchyard-id is not the id"
        );
    } else {
        // On Kafka one switchyard-id header is the wire format's id (its other-case
        // twin is dropped as reserved).
        assert_eq!(forged.id, "forged-id");
    }
    if tiers {
        // The forged retry headers are gone before the handler runs: a first delivery.
        let retry: Vec<&String> = forged
            .headers
            .keys()
            .filter(|k| k.starts_with("x-retry-"))
            .collect();
        assert!(
            retry.is_empty(),
            "forged retry headers reached the handler: {retry:?}"
        );
        assert_eq!(forged.attempt, 1, "{forged:?}");
        let retried: Vec<&Seen> = log
            .iter()
            .filter(|s| s.marker == "forged-fail-once")
            .collect();
        assert!(
            retried[1].attempt >= 2
                && retried[1].headers.get("x-retry-tier").map(String::as_str) == Some("1"),
            "the retry came back through the real tier 0: {retried:?}"
        );
        assert!(
            retried[1]
                .headers
                .iter()
                .all(|(k, v)| !k.starts_with("x-retry-") || !v.contains("elsewhere")),
            "the retry's origin is not the forged one: {:?}",
            retried[1]
        );
    }

    check_dead_letters(&letters, topic, group, &sent).await;
}

/// Dead letters: exactly the undecodable ones, with the reason, naming where they came
/// from (not the forged x-dlq-* headers).
async fn check_dead_letters(letters: &DeadLetterAdmin, topic: &str, group: &str, sent: &[Sent]) {
    let dlq = format!("{topic}.dlq");
    let records = letters.list(&dlq).await.expect("list the dead letters");
    let mut dead: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        let marker = marker_of(&r.message);
        assert_eq!(
            r.kind,
            Some(FailureKind::Decode),
            "{marker} dead-lettered as a decode failure"
        );
        assert!(
            r.error.contains("decode"),
            "{marker}: the reason names the decode: {}",
            r.error
        );
        assert_eq!(r.original_topic.as_deref(), Some(topic), "{marker}");
        assert_eq!(r.original_group.as_deref(), Some(group), "{marker}");
        *dead.entry(marker).or_default() += 1;
    }
    let want_dead: BTreeMap<String, usize> = sent
        .iter()
        .filter(|s| s.expect == "dead")
        .map(|s| (s.marker.clone(), 1))
        .collect();
    assert_eq!(dead, want_dead, "dead letters by marker");
}

/// How the messages get written: the script, at the right moment for its backend.
enum WriteFn {
    Rabbit {
        topic: String,
        group: String,
        /// Only the undecodable message with headers at the frame limit.
        frame_dead: bool,
    },
    Kafka {
        topic: String,
        group: String,
    },
}

impl WriteFn {
    /// Starts `app` and has the script write; returns what it sent and the running app.
    async fn run(
        self,
        app: App<dyn switchyard::Broker>,
        token: CancellationToken,
        tiers: Option<&RetryTiers>,
    ) -> (Vec<Sent>, switchyard::RunningApp) {
        match self {
            // RabbitMQ routes only to groups that exist: start first, the script waits
            // for the group's member.
            WriteFn::Rabbit {
                topic,
                group,
                frame_dead,
            } => {
                let running = app.start(token).await.expect("start the app");
                let variant = match (frame_dead, tiers.is_some()) {
                    (true, _) => "frame-dead",
                    (false, true) => "tiers",
                    (false, false) => "plain",
                };
                let out = tokio::task::spawn_blocking(move || {
                    python(&[
                        &script("hostile_amqp.py"),
                        "publish",
                        &amqp_url(),
                        &topic,
                        &group,
                        KEY,
                        &FROM_SCRIPT.to_string(),
                        variant,
                    ])
                })
                .await
                .unwrap();
                (parse_sent(&out), running)
            }
            // Kafka keeps the log: write first (creating the topics), then start.
            WriteFn::Kafka { topic, group } => {
                let tier_topic = tiers.map_or("-".into(), |t| t.tier_topic(&topic, &group, 0));
                let out = tokio::task::spawn_blocking(move || {
                    python(&[
                        &script("hostile_kafka.py"),
                        "produce",
                        &bootstrap(),
                        &topic,
                        KEY,
                        &FROM_SCRIPT.to_string(),
                        &tier_topic,
                    ])
                })
                .await
                .unwrap();
                let running = app.start(token).await.expect("start the app");
                (parse_sent(&out), running)
            }
        }
    }
}

/// Deletes what a RabbitMQ run declared, also when it fails.
struct RabbitCleanup {
    topic: String,
    group: String,
}

impl Drop for RabbitCleanup {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .args([
                script("hostile_amqp.py").as_str(),
                "delete",
                &amqp_url(),
                &self.topic,
                &self.group,
            ])
            .status();
    }
}

async fn rabbitmq(tiers: bool, frame_dead: bool) {
    let topic = name("amqp");
    let group = "g".to_string();
    let _cleanup = RabbitCleanup {
        topic: topic.clone(),
        group: group.clone(),
    };
    let broker = switchyard::connect(&amqp_url())
        .await
        .expect("RabbitMQ must be reachable (SWITCHYARD_AMQP_URL)");
    let write = WriteFn::Rabbit {
        topic: topic.clone(),
        group: group.clone(),
        frame_dead,
    };
    run(broker, &topic, &group, tiers, write).await;
}

async fn kafka(tiers: bool) {
    let topic = name("kafka");
    let group = "g".to_string();
    let broker = switchyard::connect(&kafka_url())
        .await
        .expect("Kafka must be reachable (SWITCHYARD_KAFKA_URL)");
    let write = WriteFn::Kafka {
        topic: topic.clone(),
        group: group.clone(),
    };
    run(broker, &topic, &group, tiers, write).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_malformed_messages_are_data_or_dead_letters() {
    rabbitmq(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_malformed_messages_with_retry_tiers() {
    rabbitmq(true, false).await;
}

/// An undecodable message whose headers fill a frame: its dead letter gains the
/// `x-dlq-*` headers, no longer fits a frame, RabbitMQ closes the publishing connection
/// (FRAME_ERROR frame_too_large), the publish is retried until its confirm timeout, the
/// delivery is nacked and comes back, again and again: its key stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_undecodable_message_with_headers_at_the_frame_limit_is_dead_lettered() {
    rabbitmq(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_malformed_records_are_data_or_dead_letters() {
    kafka(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_malformed_records_with_retry_tiers() {
    kafka(true).await;
}
