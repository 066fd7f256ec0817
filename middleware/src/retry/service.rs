//! The retry service: tower's, with a policy that counts one delivery's retries.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use switchyard_core::{Delivery, HandlerError};
use tokio::time::Sleep;
use tower::Service;

use super::{RetryFuture, RetryPolicy};
use crate::catch::CatchPanic;

/// The service [`RetryLayer`](super::RetryLayer) produces: runs the handler again after
/// a retryable failure, up to the policy's attempts, waiting out the backoff in between.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: tower::retry::Retry<Attempts, CatchPanic<S>>,
}

impl<S> Retry<S> {
    pub(super) fn new(inner: S, policy: Arc<RetryPolicy>) -> Self {
        let attempts = Attempts {
            policy,
            retries: 0,
            first: None,
        };
        Self {
            inner: tower::retry::Retry::new(attempts, CatchPanic::new(inner)),
        }
    }
}

impl<S> Service<Delivery> for Retry<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError> + Clone,
{
    type Response = ();
    type Error = HandlerError;
    type Future = RetryFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        RetryFuture::new(self.inner.call(delivery))
    }
}

/// One delivery's retries so far: tower clones the layer's (with none) for each call.
#[derive(Clone, Debug)]
pub(crate) struct Attempts {
    policy: Arc<RetryPolicy>,
    retries: u32,
    /// When the delivery first failed, for the dead-letter headers.
    first: Option<SystemTime>,
}

impl tower::retry::Policy<Delivery, (), HandlerError> for Attempts {
    // Boxed: only a retry pays for the timer's size.
    type Future = Pin<Box<Sleep>>;

    fn retry(
        &mut self,
        delivery: &mut Delivery,
        result: &mut Result<(), HandlerError>,
    ) -> Option<Self::Future> {
        let Err(error) = result else { return None };
        let first = *self.first.get_or_insert_with(|| error.first_failure());
        let policy = &*self.policy;
        if self.retries + 1 < policy.max_attempts && (policy.retry_if)(error) {
            self.retries += 1;
            tracing::debug!(retry = self.retries, error = %error, "retrying in process");
            metrics::counter!("switchyard_retried_total", "topic" => delivery.topic().to_string())
                .increment(1);
            return Some(Box::pin(tokio::time::sleep(
                policy.backoff.pause(self.retries),
            )));
        }
        // Giving up: say how many retries it took, for the dead-letter headers.
        let retries = self.retries;
        let given_up = std::mem::replace(result, Ok(()));
        *result = given_up.map_err(|e| e.with_retries(retries, first));
        None
    }

    fn clone_request(&mut self, delivery: &Delivery) -> Option<Delivery> {
        Some(delivery.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;
    use switchyard_core::backend::Acker;
    use switchyard_core::{Message, Nack, Origin};
    use tower::retry::Policy;
    use tower::{Layer, ServiceExt};

    struct NoAck;
    impl Acker for NoAck {
        fn ack(&self) -> futures::future::BoxFuture<'_, switchyard_core::Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn nack(&self, _: Nack) -> futures::future::BoxFuture<'_, switchyard_core::Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn delivery() -> Delivery {
        let origin = Origin::new("t".into(), "g".into(), None, None);
        Delivery::new(Arc::new(Message::new("x")), 1, origin, NoAck)
    }

    #[tokio::test(start_paused = true)]
    async fn each_delivery_draws_its_own_jitter() {
        // With the clock paused, equal pauses give equal deadlines.
        let policy = Arc::new(
            RetryPolicy::new(3)
                .unwrap()
                .backoff(Duration::from_millis(150), Duration::from_secs(60))
                .unwrap(),
        );
        let deadlines: std::collections::BTreeSet<_> = (0..5)
            .map(|_| {
                let mut attempts = Attempts {
                    policy: policy.clone(),
                    retries: 0,
                    first: None,
                };
                let mut failed = Err(HandlerError::transient("x"));
                attempts
                    .retry(&mut delivery(), &mut failed)
                    .expect("retried")
                    .deadline()
            })
            .collect();
        assert!(
            deadlines.len() > 1,
            "five deliveries, one pause: {deadlines:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_last_attempt_and_counts_the_retries() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let handler = tower::service_fn(move |_: Delivery| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::transient("flaky")) }
        });
        let policy = RetryPolicy::new(3).unwrap();
        let error = super::super::RetryLayer::new(policy)
            .layer(handler)
            .oneshot(delivery())
            .await
            .unwrap_err();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(error.retries(), 2);
    }

    #[tokio::test]
    async fn a_permanent_failure_is_not_retried() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let handler = tower::service_fn(move |_: Delivery| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::permanent("no")) }
        });
        let layer = super::super::RetryLayer::new(RetryPolicy::new(5).unwrap());
        let error = layer.layer(handler).oneshot(delivery()).await.unwrap_err();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(error.retries(), 0);
    }
}
