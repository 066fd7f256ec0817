//! The dead-letter service: the handler, then, after its last failure, the letter.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use switchyard_core::{Delivery, FailureKind, HandlerError};
use tower::Service;

use super::letter::{dead_letter, without_own_headers};
use super::{DeadLetterFuture, DeadLetterLayer};
use crate::recover::{OnFailure, Recover};

/// The service [`DeadLetterLayer`] produces.
#[derive(Clone)]
pub struct DeadLetter<S> {
    inner: Recover<S, DeadLetterLayer>,
}

impl<S> DeadLetter<S> {
    pub(super) fn new(inner: S, config: Arc<DeadLetterLayer>) -> Self {
        Self {
            inner: Recover::new(inner, config),
        }
    }
}

impl<S> Service<Delivery> for DeadLetter<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
{
    type Response = ();
    type Error = HandlerError;
    type Future = DeadLetterFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        DeadLetterFuture::new(self.inner.call(delivery))
    }
}

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
                config.outages.lock().record(&delivery);
                return Err(error);
            }
            let outages = config.outages.lock().of(&delivery);
            let counted = delivery.delivery_count().saturating_sub(outages);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::headers;
    use crate::dead_letter::letter::MAX_ERROR_TEXT;
    use switchyard_core::backend::Acker;
    use switchyard_core::{Message, Nack, Origin, Publisher};

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

    /// A memory broker and a reader of `t.dlq` on it.
    async fn broker_reading_dlq() -> (
        Arc<switchyard_memory::MemoryBroker>,
        Box<dyn switchyard_core::Subscription>,
    ) {
        let broker = Arc::new(switchyard_memory::MemoryBroker::new());
        let sub = switchyard_core::Subscriber::subscribe(
            &*broker,
            switchyard_core::SubscribeOptions::new("t.dlq", "read"),
        )
        .await
        .unwrap();
        (broker, sub)
    }

    #[tokio::test]
    async fn dead_letter_headers_the_message_brought_along_are_not_kept() {
        let (broker, mut sub) = broker_reading_dlq().await;
        let layer = DeadLetterLayer::new(broker.clone());
        // Keyless, from a memory topic (no partition): forged headers would stand.
        let forged = Message::new("x")
            .with_header(headers::ORIGINAL_KEY, "forged")
            .with_header(headers::ORIGINAL_PARTITION, "7");
        layer
            .on_failure(
                delivery(&Arc::new(forged), 1),
                HandlerError::permanent("no"),
            )
            .await
            .unwrap();
        let letter = sub.recv().await.unwrap().unwrap();
        let h = &letter.message().headers;
        assert!(!h.contains_key(headers::ORIGINAL_KEY), "{h:?}");
        assert!(!h.contains_key(headers::ORIGINAL_PARTITION), "{h:?}");
        assert_eq!(h[headers::ERROR_KIND], "permanent");
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
        let (broker, mut sub) = broker_reading_dlq().await;
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
