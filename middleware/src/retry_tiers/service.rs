//! The service that sends a failed delivery to its next retry tier.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use switchyard_core::{Delivery, FailureKind, HandlerError};
use tower::Service;

use super::{header, headers, RetryTiers, RetryTiersFuture};
use crate::recover::{OnFailure, Recover};

/// The service [`RetryTiersLayer`](super::RetryTiersLayer) produces.
#[derive(Clone)]
pub struct RetryTiersService<S> {
    inner: Recover<S, RetryTiers>,
}

impl<S> RetryTiersService<S> {
    pub(super) fn new(inner: S, tiers: Arc<RetryTiers>) -> Self {
        Self {
            inner: Recover::new(inner, tiers),
        }
    }
}

impl<S> Service<Delivery> for RetryTiersService<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError>,
{
    type Response = ();
    type Error = HandlerError;
    type Future = RetryTiersFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        RetryTiersFuture::new(self.inner.call(delivery))
    }
}

impl OnFailure for RetryTiers {
    fn on_failure(
        &self,
        delivery: Delivery,
        error: HandlerError,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let tiers = self.clone();
        Box::pin(async move {
            // A store outage is not the message's failure: it must not use up a tier.
            if !error.is_retryable() || error.kind() == FailureKind::Unavailable {
                return Err(error);
            }
            let m = delivery.message();
            let hops: usize = header(m, headers::TIER).unwrap_or(0);
            let Some(delay) = tiers.delays.get(hops).copied() else {
                return Err(error); // tiers exhausted: on to the dead-letter layer
            };
            // The delivery's own topic, never a header: [`RetryTiersInbound`] presents a tier's
            // deliveries as coming from the original topic, and a header could be forged
            // to send the retry into another topic's group.
            let origin = delivery.topic().to_string();
            let group = delivery.group().to_string();
            let due = SystemTime::now() + delay;
            // Rounded up: a retry may come a millisecond late, never early.
            let due_ms = due
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .div_ceil(1_000_000);
            let mut next = m.clone();
            let h = &mut next.headers;
            h.insert(headers::TIER.into(), (hops + 1).to_string());
            h.insert(headers::DUE.into(), due_ms.to_string());
            h.insert(headers::ORIGINAL_TOPIC.into(), origin.clone());
            h.insert(headers::ERROR.into(), error.source_error().to_string());
            // Where it first came from, for the dead-letter headers if all tiers fail.
            if !h.contains_key(headers::ORIGINAL_PARTITION) {
                let o = delivery.origin();
                if let Some(p) = o.partition {
                    h.insert(headers::ORIGINAL_PARTITION.into(), p.to_string());
                }
                if let Some(off) = o.offset {
                    h.insert(headers::ORIGINAL_OFFSET.into(), off.to_string());
                }
            }
            let (sent, to) = if tiers.native {
                let sent = tiers
                    .broker
                    .redeliver_after(&origin, &group, next, delay)
                    .await;
                (sent, format!("{origin} (delayed {delay:?} by the broker)"))
            } else {
                let topic = tiers.tier_topic(&origin, &group, hops);
                let sent = tiers.broker.publish(&topic, next).await.map(drop);
                (sent, topic)
            };
            match sent {
                Ok(()) => {
                    tracing::info!(
                        id = delivery.id(),
                        tier = hops,
                        ?delay,
                        to,
                        "sent to retry tier"
                    );
                    Ok(())
                }
                Err(e) => Err(HandlerError::transient(format!(
                    "{error}; and sending it to retry tier {to} failed: {e}"
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry_tiers::RetryTiersLayer;
    use std::time::Duration;
    use switchyard_core::backend::Acker;
    use switchyard_core::{handler_fn, AnyBroker, Message, Nack, Origin, Result, SubscribeOptions};
    use tower::{Layer, ServiceExt};

    struct NoAck;
    impl Acker for NoAck {
        fn ack(&self) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn nack(&self, _: Nack) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_store_outage_does_not_use_up_a_tier() {
        let broker: AnyBroker = Arc::new(switchyard_memory::MemoryBroker::new());
        let tiers = RetryTiers::new(broker.clone(), [Duration::from_millis(10)]).unwrap();
        async fn down(_: Delivery) -> Result<(), HandlerError> {
            Err(HandlerError::unavailable(std::io::Error::other(
                "store down",
            )))
        }
        let service = RetryTiersLayer::new(tiers.clone()).layer(handler_fn(down));
        let origin = Origin::new("t".into(), "g".into(), None, None);
        let delivery = Delivery::new(Arc::new(Message::new("x")), 1, origin, NoAck);
        let e = service.oneshot(delivery).await.unwrap_err();
        assert_eq!(e.kind(), FailureKind::Unavailable);
        let mut sub = broker
            .subscribe(SubscribeOptions::new(
                tiers.tier_topic("t", "g", 0),
                "probe",
            ))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await;
        assert!(got.is_err(), "nothing was sent to the tier topic");
    }
}
