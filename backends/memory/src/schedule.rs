//! Scheduled publish: one tokio timer per message, which appends it to its topic when
//! it comes due, so every group of the topic gets it then.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use switchyard_core::backend::{check_headers, validate_name, Backoff};
use switchyard_core::{CancellationToken, Error, Message, Publisher, Receipt, Result};

use crate::broker::BACKEND;
use crate::MemoryBroker;

/// Pauses between tries to publish a due message to a full topic.
const RETRY: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));

/// The pending timers of one broker. They hold the broker weakly (a timer must not keep
/// a dropped broker alive) and end, messages unpublished, on [`MemoryBroker::shutdown`]
/// or when the broker's last handle goes.
#[derive(Default)]
pub(crate) struct Timers {
    cancel: CancellationToken,
}

impl Timers {
    /// Drops every pending timer and refuses new ones.
    pub(crate) fn cancel_all(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl MemoryBroker {
    /// Checks `message` now (headers, size, topic name: what a publish would refuse),
    /// then starts a timer that publishes it to `topic` no sooner than `when`. A time
    /// already past publishes at once, from the timer task. A topic full past
    /// `publish_timeout` when it is due is tried again, with backoff, until it takes the
    /// message or the broker shuts down; only a refusal for good is logged and dropped.
    pub(crate) async fn schedule(
        &self,
        topic: &str,
        message: Message,
        when: SystemTime,
    ) -> Result<Receipt> {
        validate_name("topic", topic)?;
        check_headers(&message)?;
        if let Some(limit) = self.inner.config.max_message_size {
            if message.payload.len() > limit {
                return Err(Error::MessageTooLarge {
                    id: message.id.clone(),
                    size: message.payload.len(),
                    limit,
                    backend: BACKEND,
                });
            }
        }
        let cancel = self.inner.timers.cancel.clone();
        if cancel.is_cancelled() {
            return Err(Error::Closed { backend: BACKEND });
        }
        let receipt = Receipt::new(message.id.clone(), None, None);
        let broker = Arc::downgrade(&self.inner);
        let topic = topic.to_string();
        tokio::spawn(async move {
            // tokio's timers run on the monotonic clock and the due time is on the wall
            // clock: sleep again for whatever a clock step left, so it is never early.
            while let Ok(left) = when.duration_since(SystemTime::now()) {
                if left.is_zero() {
                    break;
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(left) => {}
                }
            }
            if cancel.is_cancelled() {
                return;
            }
            let id = message.id.clone();
            let mut pauses = RETRY.pauses();
            loop {
                let Some(inner) = broker.upgrade() else {
                    return;
                };
                let error = match (MemoryBroker { inner })
                    .publish(&topic, message.clone())
                    .await
                {
                    Ok(_) => return,
                    Err(e @ Error::Closed { .. }) => e,
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, topic, id, "a scheduled message is due and its topic is full; trying again");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(1))) => {}
                        }
                        continue;
                    }
                    Err(e) => e,
                };
                tracing::warn!(%error, topic, id, "a scheduled message could not be published when due; dropped");
                return;
            }
        });
        Ok(receipt)
    }
}

#[cfg(test)]
mod tests {
    use switchyard_core::{SubscribeOptions, Subscriber};

    use super::*;

    #[tokio::test]
    async fn a_scheduled_message_waits_for_its_time_then_reaches_every_group() {
        let broker = MemoryBroker::new();
        let mut a = broker
            .subscribe(SubscribeOptions::new("t", "a"))
            .await
            .unwrap();
        let mut b = broker
            .subscribe(SubscribeOptions::new("t", "b"))
            .await
            .unwrap();
        let due = SystemTime::now() + Duration::from_millis(200);
        let receipt = broker
            .schedule("t", Message::new("later").with_key("k"), due)
            .await
            .unwrap();
        assert_eq!(broker.topic_stats("t").unwrap().0, 0, "published early");
        for sub in [&mut a, &mut b] {
            let d = sub.recv().await.unwrap().unwrap();
            assert!(SystemTime::now() >= due, "delivered before it was due");
            assert_eq!((d.id(), d.payload()), (receipt.id.as_str(), &b"later"[..]));
            assert_eq!(d.message().key.as_deref(), Some("k"));
            d.ack().await.unwrap();
        }
    }

    #[tokio::test]
    async fn shutdown_drops_pending_timers_and_refuses_new_ones() {
        let broker = MemoryBroker::new();
        // A topic that does not exist yet: shutdown closes only existing topics, so a
        // timer left running would create it and publish there.
        let due = SystemTime::now() + Duration::from_millis(100);
        broker
            .schedule("fresh", Message::new("x"), due)
            .await
            .unwrap();
        broker.shutdown();
        let err = broker
            .schedule("fresh", Message::new("y"), due)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Closed { .. }), "{err}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            broker.topic_stats("fresh").is_none(),
            "a dropped timer published"
        );
    }

    #[tokio::test]
    async fn what_a_publish_would_refuse_is_refused_at_once() {
        let broker = MemoryBroker::new();
        let now = SystemTime::now();
        let bad_topic = broker.schedule("no space", Message::new("x"), now).await;
        assert!(matches!(bad_topic, Err(Error::InvalidName { .. })));
        let reserved = Message::new("x").with_header("switchyard-id", "forged");
        assert!(broker.schedule("t", reserved, now).await.is_err());
    }

    #[tokio::test]
    async fn a_message_due_while_its_topic_is_full_waits_for_room() {
        let broker = MemoryBroker::with_config(
            crate::MemoryConfig::default()
                .capacity(1)
                .publish_timeout(Duration::from_millis(20)),
        );
        let mut sub = broker
            .subscribe(SubscribeOptions::new("t", "g"))
            .await
            .unwrap();
        broker.publish("t", Message::new("first")).await.unwrap();
        let due = Message::new("due");
        broker
            .schedule("t", due.clone(), SystemTime::now())
            .await
            .unwrap();
        // Full for several publish timeouts, then room.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let first = sub.recv().await.unwrap().unwrap();
        first.ack().await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("the due message arrives once there is room")
            .unwrap()
            .unwrap();
        assert_eq!(next.id(), due.id);
    }
}
