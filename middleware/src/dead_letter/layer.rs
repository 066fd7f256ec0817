//! The layer that dead-letters a message after its last failure.

use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use switchyard_core::{Delivery, HandlerError, Message, Publisher};
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
#[derive(Clone)]
pub struct DeadLetterLayer {
    publisher: Arc<dyn Publisher>,
    topic_for: Arc<TopicFn>,
    max_deliveries: u32,
}

impl DeadLetterLayer {
    /// Dead-letters to `<topic>.dlq` through `publisher`.
    pub fn new(publisher: Arc<dyn Publisher>) -> Self {
        Self {
            publisher,
            topic_for: Arc::new(default_dlq_topic),
            max_deliveries: 1,
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
            if error.is_retryable() && delivery.attempt() < config.max_deliveries {
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
