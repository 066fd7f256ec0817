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
            match config.publisher.publish(&topic, letter).await {
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

/// The dead letter for a failed delivery: the same message plus failure headers.
fn dead_letter(delivery: &Delivery, error: &HandlerError) -> Message {
    let origin = delivery.origin();
    let mut m = delivery.message().clone();
    let h = &mut m.headers;
    h.insert(headers::ERROR.into(), error.source_error().to_string());
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
}
