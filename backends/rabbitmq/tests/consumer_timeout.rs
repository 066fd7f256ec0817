//! RabbitMQ's `consumer_timeout` reached by a slow handler: the broker closes the
//! partition's channel, the message is redelivered and handled again, an error log line
//! names the timeout, and nothing is lost.
//!
//! Ignored by default; `scripts/long` runs it (`--ignored`). RabbitMQ 3.x's
//! `consumer_timeout` is broker-wide, read by each channel when it opens, checked on the
//! channel's tick (once a minute) and not settable below one minute: the test sets it to
//! 60 s with `rabbitmqctl eval`, which affects every channel opened meanwhile, and puts
//! the previous value back when it ends, failed or not. It takes 2–3 minutes. Against
//! the local broker (`SWITCHYARD_AMQP_URL` overrides); fails, never skips, when the
//! broker or `rabbitmqctl` is missing.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_core::{
    Broker, CancellationToken, Consumer, Delivery, HandlerError, Message, Publisher,
    SubscribeOptions,
};
use switchyard_rabbitmq::RabbitBroker;

fn eval(expr: &str) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "eval", expr])
        .output()
        .expect("rabbitmqctl must be runnable (the test sets consumer_timeout with it)");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "rabbitmqctl eval {expr:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The broker's `consumer_timeout` set for the test's duration; the previous value (or
/// its absence) comes back on drop.
struct ConsumerTimeout {
    previous: String,
}

impl ConsumerTimeout {
    fn set(ms: u64) -> Self {
        let previous = eval("application:get_env(rabbit, consumer_timeout).");
        assert!(
            previous == "undefined" || previous.starts_with("{ok,"),
            "unexpected consumer_timeout {previous:?}"
        );
        eval(&format!(
            "application:set_env(rabbit, consumer_timeout, {ms})."
        ));
        Self { previous }
    }
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        let restore = match self
            .previous
            .strip_prefix("{ok,")
            .and_then(|v| v.strip_suffix('}'))
        {
            Some(value) => format!("application:set_env(rabbit, consumer_timeout, {value})."),
            None => "application:unset_env(rabbit, consumer_timeout).".to_string(),
        };
        eval(&restore);
        eprintln!("consumer_timeout restored to {}", self.previous);
    }
}

/// WARN and ERROR events, as text, for checking what was logged (this crate has no
/// tracing-subscriber; the trait needs only these few methods).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Captured {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let line = format!("{} {}", event.metadata().level(), fields.0);
        eprintln!("log: {line}");
        self.0.lock().unwrap().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

const GROUP: &str = "slow";
/// The broker's minimum, and the shortest the test can wait for.
const TIMEOUT_MS: u64 = 60_000;
/// The channel tick checks the timeout once a minute: a delivery is caught between one
/// and two minutes after it was handed out. The slow handler waits at most this long.
const SLOW_LIMIT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "sets RabbitMQ's broker-wide consumer_timeout to 60 s for 2-3 minutes; scripts/long runs it"]
async fn a_handler_past_consumer_timeout_is_redelivered_logged_and_loses_nothing() {
    let logs = Captured::default();
    tracing::subscriber::set_global_default(logs.clone()).expect("the only subscriber");
    let started = Instant::now();
    // Before connecting: channels read the timeout when they open.
    let setting = ConsumerTimeout::set(TIMEOUT_MS);
    let topic = switchyard_conformance::support::unique_name("syr-acktimeout");
    let outcome = tokio::spawn(run(topic.clone())).await;
    drop(setting);
    common::cleanup_if_reachable(&topic, GROUP).await;
    let report = match outcome {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let logged: Vec<String> = logs
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("ERROR") && l.contains("consumer_timeout"))
        .cloned()
        .collect();
    // Past the test harness's capture, so the line reaches the log.
    let _ = writeln!(
        std::io::stdout(),
        "fault=consumer-timeout backend=rabbitmq published={} delivered={} lost={} \
         duplicated={} redelivered_after_s={} logged={} took_s={}",
        report.published,
        report.delivered,
        report.published - report.delivered,
        report.duplicated,
        report.redelivered_after.as_secs(),
        logged.len(),
        started.elapsed().as_secs()
    );
    assert!(
        !logged.is_empty(),
        "no ERROR line names consumer_timeout; WARN/ERROR lines: {:?}",
        logs.0.lock().unwrap()
    );
    assert_eq!(report.published, report.delivered, "messages lost");
}

struct Report {
    published: usize,
    delivered: usize,
    duplicated: usize,
    redelivered_after: Duration,
}

async fn run(topic: String) -> Report {
    let broker = Arc::new(
        RabbitBroker::connect(&common::url())
            .await
            .expect("RabbitMQ must be reachable"),
    );
    let handled: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let again = Arc::new(tokio::sync::Notify::new());
    let slow_id: Arc<Mutex<Option<String>>> = Arc::default();
    let handler = {
        let (handled, again, slow_id) = (handled.clone(), again.clone(), slow_id.clone());
        move |d: Delivery| {
            let (handled, again, slow_id) = (handled.clone(), again.clone(), slow_id.clone());
            async move {
                let seen = {
                    let mut h = handled.lock().unwrap();
                    let n = h.entry(d.id().to_string()).or_default();
                    *n += 1;
                    *n
                };
                if d.payload() == b"slow" {
                    if seen == 1 {
                        *slow_id.lock().unwrap() = Some(d.id().to_string());
                        // Past the broker's timeout: held until the redelivery arrives.
                        let _ = tokio::time::timeout(SLOW_LIMIT, again.notified()).await;
                    } else {
                        again.notify_one();
                    }
                }
                Ok::<_, HandlerError>(())
            }
        }
    };
    let shutdown = CancellationToken::new();
    let consumer = Consumer::handler(SubscribeOptions::new(&topic, GROUP).prefetch(16), handler)
        .concurrency(4)
        .start(broker.clone(), shutdown.clone())
        .await
        .unwrap();

    let mut ids = Vec::new();
    let slow = Message::new("slow").with_key("slow");
    ids.push(slow.id.clone());
    broker.publish(&topic, slow).await.unwrap();
    let handed_out = Instant::now();
    for i in 0..20 {
        let m = Message::new(format!("fast {i}")).with_key(format!("k{i}"));
        ids.push(m.id.clone());
        broker.publish(&topic, m).await.unwrap();
    }
    // The redelivery of the slow message.
    let deadline = Instant::now() + SLOW_LIMIT;
    let redelivered_after = loop {
        let twice = slow_id
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|id| handled.lock().unwrap().get(id).copied().unwrap_or(0) >= 2);
        if twice {
            break handed_out.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the slow message was not redelivered within {SLOW_LIMIT:?} of a {TIMEOUT_MS} ms \
             consumer_timeout"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The member took the partition back: later messages are handled too.
    for i in 0..10 {
        let m = Message::new(format!("after {i}")).with_key(format!("k{i}"));
        ids.push(m.id.clone());
        broker.publish(&topic, m).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let h = handled.lock().unwrap();
            ids.iter().filter(|id| !h.contains_key(*id)).count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} messages never handled",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), consumer.join()).await;
    let _ = broker.close().await;
    let h = handled.lock().unwrap();
    Report {
        published: ids.len(),
        delivered: ids.iter().filter(|id| h.contains_key(*id)).count(),
        duplicated: h.values().map(|n| n - 1).sum(),
        redelivered_after,
    }
}
