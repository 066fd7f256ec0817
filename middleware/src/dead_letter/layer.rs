//! The layer that dead-letters a message after its last failure.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::future::BoxFuture;
use switchyard_core::{Delivery, FailureKind, HandlerError, Message, Publisher};
use tower::Layer;

use crate::recover::{OnFailure, Recover};

use super::{default_dlq_topic, headers};

type TopicFn = dyn Fn(&str) -> String + Send + Sync;

/// Dead-letters a delivery whose handler failed for the last time.
///
/// "Last time" means: the failure is not retryable (permanent, decode), or the delivery
/// has reached `max_deliveries` broker deliveries (default 1: the first failed delivery
/// is dead-lettered, so put a [`RetryPolicy`](crate::RetryPolicy) layer inside this one to
/// retry in process first). Earlier failures pass through, and the runtime nacks them for
/// redelivery.
///
/// A [`FailureKind::Unavailable`] failure (a store the handling depends on was down) is
/// never dead-lettered, and the deliveries it cost do not count toward `max_deliveries`.
#[derive(Clone)]
pub struct DeadLetterLayer {
    publisher: Arc<dyn Publisher>,
    topic_for: Arc<TopicFn>,
    max_deliveries: u32,
    outages: Arc<Mutex<Outages>>,
}

/// How many deliveries of each message ended in an outage, for the most recent
/// [`OUTAGE_MEMORY`] messages: the broker counts those deliveries, this layer does not.
#[derive(Default)]
struct Outages {
    counts: HashMap<(Arc<str>, Arc<str>), u32>,
    order: VecDeque<(Arc<str>, Arc<str>)>,
}

/// Messages whose outage counts are remembered; the oldest is forgotten first. Past it a
/// message may be dead-lettered early, after an outage that outlasted that many others.
const OUTAGE_MEMORY: usize = 10_000;

impl Outages {
    fn key(delivery: &Delivery) -> (Arc<str>, Arc<str>) {
        (delivery.group().into(), delivery.id().into())
    }

    fn record(&mut self, delivery: &Delivery) {
        let key = Self::key(delivery);
        if let Some(n) = self.counts.get_mut(&key) {
            *n += 1;
            return;
        }
        if self.order.len() >= OUTAGE_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.counts.remove(&old);
            }
        }
        self.order.push_back(key.clone());
        self.counts.insert(key, 1);
    }

    fn of(&self, delivery: &Delivery) -> u32 {
        if self.counts.is_empty() {
            return 0;
        }
        self.counts.get(&Self::key(delivery)).copied().unwrap_or(0)
    }
}

impl DeadLetterLayer {
    /// Dead-letters to `<topic>.dlq` through `publisher`.
    pub fn new(publisher: Arc<dyn Publisher>) -> Self {
        Self {
            publisher,
            topic_for: Arc::new(default_dlq_topic),
            max_deliveries: 1,
            outages: Arc::default(),
        }
    }

    /// Names the dead-letter topic of each topic (default `<topic>.dlq`).
    pub fn topic(mut self, topic_for: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.topic_for = Arc::new(topic_for);
        self
    }

    /// How many broker deliveries a retryable failure gets before it is dead-lettered.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }
}

impl<S> Layer<S> for DeadLetterLayer {
    type Service = DeadLetter<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recover::new(inner, self.clone())
    }
}

/// The service [`DeadLetterLayer`] produces.
pub type DeadLetter<S> = Recover<S, DeadLetterLayer>;

impl OnFailure for DeadLetterLayer {
    fn on_failure(
        &self,
        delivery: Delivery,
        error: HandlerError,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let config = self.clone();
        Box::pin(async move {
            if error.kind() == FailureKind::Unavailable {
                // Not the message's fault: redeliver it, and do not count this delivery.
                config.outages.lock().expect("outages").record(&delivery);
                return Err(error);
            }
            let outages = config.outages.lock().expect("outages").of(&delivery);
            let counted = delivery.attempt().saturating_sub(outages);
            if error.is_retryable() && counted < config.max_deliveries {
                return Err(error);
            }
            let topic = (config.topic_for)(delivery.topic());
            let letter = dead_letter(&delivery, &error);
            let mut sent = config.publisher.publish(&topic, letter).await;
            if let Err(refused) = &sent {
                if !refused.is_transient() {
                    // The broker refuses this letter whole (its headers, say, no longer
                    // fit once the failure headers are added): without its own headers
                    // it still goes, so a poison message never loops for want of a DLQ.
                    let slim = without_own_headers(dead_letter(&delivery, &error), refused);
                    sent = config.publisher.publish(&topic, slim).await;
                }
            }
            match sent {
                Ok(_) => {
                    metrics::counter!("switchyard_dead_lettered_total", "topic" => delivery.topic().to_string())
                        .increment(1);
                    tracing::warn!(
                        id = delivery.id(),
                        topic = delivery.topic(),
                        dlq = topic,
                        kind = %error.kind(),
                        error = %error,
                        "dead-lettered"
                    );
                    Ok(())
                }
                Err(publish_error) => {
                    // Not dead-lettered, so not acked either: the broker redelivers it.
                    tracing::error!(id = delivery.id(), dlq = topic, error = %publish_error, "dead-letter publish failed; nacking");
                    Err(HandlerError::transient(format!(
                        "{error}; and publishing to the dead-letter topic {topic} failed: {publish_error}"
                    )))
                }
            }
        })
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The longest error text a dead letter carries: the rest is cut, so a long error
/// cannot make the letter too large for the broker.
const MAX_ERROR_TEXT: usize = 4096;

fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// `letter` with only the dead-letter headers (and the content type) kept, and a note
/// of what was dropped and why.
fn without_own_headers(mut letter: Message, why: &switchyard_core::Error) -> Message {
    let before = letter.headers.len();
    letter.headers.retain(|name, _| {
        headers::ALL.contains(&name.as_str()) || name == switchyard_core::CONTENT_TYPE_HEADER
    });
    let dropped = before - letter.headers.len();
    letter.headers.insert(
        headers::HEADERS_DROPPED.into(),
        truncated(format!("{dropped}: {why}"), 512),
    );
    letter
}

/// The dead letter for a failed delivery: the same message plus failure headers.
fn dead_letter(delivery: &Delivery, error: &HandlerError) -> Message {
    let origin = delivery.origin();
    let mut m = delivery.message().clone();
    let h = &mut m.headers;
    h.insert(
        headers::ERROR.into(),
        truncated(error.source_error().to_string(), MAX_ERROR_TEXT),
    );
    h.insert(headers::ERROR_KIND.into(), error.kind().as_str().into());
    h.insert(headers::ATTEMPTS.into(), delivery.attempt().to_string());
    h.insert(headers::RETRIES.into(), error.retries().to_string());
    h.insert(headers::ORIGINAL_TOPIC.into(), origin.topic.to_string());
    h.insert(headers::ORIGINAL_GROUP.into(), origin.group.to_string());
    if let Some(p) = origin.partition {
        h.insert(headers::ORIGINAL_PARTITION.into(), p.to_string());
    }
    if let Some(o) = origin.offset {
        h.insert(headers::ORIGINAL_OFFSET.into(), o.to_string());
    }
    h.insert(
        headers::FIRST_FAILURE.into(),
        rfc3339(error.first_failure()),
    );
    h.insert(headers::LAST_FAILURE.into(), rfc3339(SystemTime::now()));
    if let Some(key) = m.key.take() {
        m.headers.insert(headers::ORIGINAL_KEY.into(), key);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{Acker, Nack, Origin};

    struct NoAck;

    impl Acker for NoAck {
        fn ack(&self) -> BoxFuture<'_, switchyard_core::Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn nack(&self, _: Nack) -> BoxFuture<'_, switchyard_core::Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn delivery(message: &Arc<Message>, attempt: u32) -> Delivery {
        let origin = Origin::new("t".into(), "g".into(), None, None);
        Delivery::new(message.clone(), attempt, origin, NoAck)
    }

    #[tokio::test]
    async fn outages_are_never_dead_lettered_nor_counted() {
        let broker = Arc::new(switchyard_memory::MemoryBroker::new());
        let layer = DeadLetterLayer::new(broker.clone()).max_deliveries(3);
        let message = Arc::new(Message::new("x"));
        for attempt in 1..=5 {
            let error = HandlerError::unavailable("store down");
            let passed = layer.on_failure(delivery(&message, attempt), error).await;
            assert_eq!(passed.unwrap_err().kind(), FailureKind::Unavailable);
        }
        // Five deliveries were outages: the sixth is the message's first counted one.
        for attempt in 6..=7 {
            let error = HandlerError::transient("flaky");
            let passed = layer.on_failure(delivery(&message, attempt), error).await;
            assert!(
                passed.is_err(),
                "delivery {attempt} passed on for redelivery"
            );
        }
        let error = HandlerError::transient("flaky");
        layer
            .on_failure(delivery(&message, 8), error)
            .await
            .expect("the third counted delivery is dead-lettered");
    }

    /// Refuses, permanently, any message with more than 15 headers.
    struct Picky(Arc<switchyard_memory::MemoryBroker>);

    #[async_trait::async_trait]
    impl Publisher for Picky {
        async fn publish(
            &self,
            topic: &str,
            message: Message,
        ) -> switchyard_core::Result<switchyard_core::Receipt> {
            if message.headers.len() > 15 {
                return Err(switchyard_core::Error::permanent(
                    "test",
                    "the headers do not fit in a frame",
                ));
            }
            self.0.publish(topic, message).await
        }
    }

    #[tokio::test]
    async fn a_letter_refused_whole_goes_without_the_messages_own_headers() {
        let broker = Arc::new(switchyard_memory::MemoryBroker::new());
        let mut sub = switchyard_core::Subscriber::subscribe(
            &*broker,
            switchyard_core::SubscribeOptions::new("t.dlq", "read"),
        )
        .await
        .unwrap();
        let layer = DeadLetterLayer::new(Arc::new(Picky(broker.clone())));
        let mut m = Message::new("poison").with_key("k");
        for i in 0..10 {
            m = m.with_header(format!("h{i}"), "v");
        }
        let error = HandlerError::permanent("x".repeat(100_000));
        layer
            .on_failure(delivery(&Arc::new(m), 1), error)
            .await
            .expect("dead-lettered without its own headers");
        let letter = sub.recv().await.unwrap().unwrap();
        let h = &letter.message().headers;
        assert!(h.keys().all(|k| k.starts_with("x-dlq-")), "{h:?}");
        assert!(h[headers::HEADERS_DROPPED].starts_with("10: "), "{h:?}");
        assert_eq!(h[headers::ORIGINAL_KEY], "k");
        assert!(
            h[headers::ERROR].len() <= MAX_ERROR_TEXT + 3,
            "the error text is cut"
        );
    }
}
