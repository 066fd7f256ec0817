//! Publishing: records handed to librdkafka's idempotent producer, then their
//! acknowledgements awaited together.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::try_join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use switchyard_core::backend::Backoff;
use switchyard_core::backend::{check_headers, validate_name};
use switchyard_core::{Error, Message, Publisher, Receipt, Result};

use crate::broker::{kafka_error, KafkaBroker, BACKEND};
use crate::config::DeliveryGuarantee;
use crate::record;

/// The longest wait between tries to hand a record to librdkafka's full queue: short,
/// since the queue drains at the broker's pace and waiting longer only adds latency.
const QUEUE_FULL_MAX: Duration = Duration::from_millis(10);
/// Waits between those tries.
const QUEUE_FULL: Backoff = Backoff::new(Duration::from_millis(1), QUEUE_FULL_MAX);

impl KafkaBroker {
    pub(crate) fn check_size(&self, message: &Message) -> Result<()> {
        let limit = self.inner.config.max_message_size;
        // The payload is what the caller controls; a record whose key and headers push
        // it over the limit is refused by librdkafka and mapped to the same error.
        if message.payload.len() > limit {
            return Err(self.too_large(message));
        }
        Ok(())
    }

    fn too_large(&self, message: &Message) -> Error {
        Error::MessageTooLarge {
            id: message.id.clone(),
            size: message.payload.len(),
            limit: self.inner.config.max_message_size,
            backend: BACKEND,
        }
    }

    /// Hands one record to librdkafka, waiting while its queue is full.
    async fn enqueue(&self, topic: &str, message: &Message) -> Result<DeliveryFuture> {
        let headers = record::headers(message);
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
            .payload(&message.payload[..])
            .headers(headers)
            .timestamp(record::millis(message.timestamp));
        if let Some(key) = &message.key {
            rec = rec.key(key.as_str());
        }
        let mut pauses = QUEUE_FULL.pauses();
        loop {
            match self.inner.producer.send_result(rec) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // librdkafka's queue drains as the broker acknowledges; wait briefly.
                    rec = back;
                    tokio::time::sleep(pauses.next().unwrap_or(QUEUE_FULL_MAX)).await;
                }
                Err((e, _)) => return Err(self.produce_error(message, e)),
            }
        }
    }

    fn produce_error(&self, message: &Message, e: KafkaError) -> Error {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => self.too_large(message),
            Some(RDKafkaErrorCode::MessageTimedOut) => self.unreachable(
                self.inner.config.publish_timeout,
                format!("message {} to be acknowledged", message.id),
            ),
            _ => kafka_error(
                format!("publishing message {} to {}", message.id, self.servers()),
                e,
            ),
        }
    }

    async fn settle(&self, message: &Message, future: DeliveryFuture) -> Result<Receipt> {
        match future.await {
            Err(_) => Err(Error::Closed { backend: BACKEND }),
            Ok(Err((e, _))) => Err(self.produce_error(message, e)),
            Ok(Ok(d)) => {
                // With acks=0 the broker never answers, so there is no offset to report.
                let offset = match self.inner.config.delivery {
                    DeliveryGuarantee::AtMostOnce => None,
                    DeliveryGuarantee::AtLeastOnce => Some(d.offset).filter(|o| *o >= 0),
                };
                Ok(Receipt::new(message.id.clone(), Some(d.partition), offset))
            }
        }
    }

    async fn publish_inner(&self, topic: &str, messages: &[Message]) -> Result<Vec<Receipt>> {
        self.check_open()?;
        validate_name("topic", topic)?;
        messages.iter().try_for_each(check_headers)?;
        messages.iter().try_for_each(record::check_header_names)?;
        self.ensure_topic(topic).await?;
        // Enqueue everything first, then await the acknowledgements: librdkafka batches
        // the records into few produce requests, and the idempotent producer keeps them
        // in order per partition. An oversize message is refused on its own: the others
        // are still published (a too-large record must not fail the broker-side batch it
        // would have travelled in), and the error names it.
        let mut refused = None;
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let queued = match self.check_size(m) {
                Ok(()) => self.enqueue(topic, m).await,
                Err(e) => Err(e),
            };
            match queued {
                Ok(f) => pending.push((m, f)),
                Err(e @ Error::MessageTooLarge { .. }) => {
                    refused.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let receipts = try_join_all(pending.into_iter().map(|(m, f)| self.settle(m, f))).await?;
        match refused {
            Some(e) => Err(e),
            None => Ok(receipts),
        }
    }
}

#[async_trait]
impl Publisher for KafkaBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        let mut r = self
            .publish_inner(topic, std::slice::from_ref(&message))
            .await?;
        Ok(r.pop().expect("one receipt per message"))
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<Vec<Receipt>> {
        self.publish_inner(topic, &messages).await
    }
}
