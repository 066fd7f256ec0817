//! In-process retry with exponential backoff, jitter and a cap (the seed's section 7).
//!
//! The timing is tower's `ExponentialBackoff`, so there is no hand-rolled backoff here;
//! the service around it ([`Retry`]) is ours, for two reasons. It keeps the per-delivery
//! retry state in its future and builds it only after a failure, so the success path
//! copies no policy and allocates nothing. And each delivery's backoff draws from its
//! own random source: `tower::retry` clones one policy per request, and with it the same
//! jitter sequence, so deliveries that fail together would retry together.
//!
//! A retried delivery keeps its place: it holds one concurrency slot and its key (later
//! same-key messages wait, other keys flow on), and it is never nacked between attempts.
//! A handler that panics counts as a retryable failure, like a transient error.

mod tiers;

pub use tiers::{
    RetryTiers, RetryTopic, RetryTopicLayer, Tiered, DUE_HEADER, ERROR_HEADER, ORIGIN_HEADER,
    ORIGIN_OFFSET_HEADER, ORIGIN_PARTITION_HEADER, TIER_HEADER,
};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::ready;
use pin_project_lite::pin_project;
use switchyard_core::{Delivery, Error, HandlerError, Result};
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::rng::HasherRng;
use tower::{Layer, Service};

use crate::recover::Caught;

type Predicate = dyn Fn(&HandlerError) -> bool + Send + Sync;

/// When and how often to retry a failed handler in process.
///
/// ```
/// use std::time::Duration;
/// use switchyard_middleware::RetryPolicy;
/// let layer = RetryPolicy::new(5)
///     .unwrap()
///     .backoff(Duration::from_millis(100), Duration::from_secs(10))
///     .unwrap()
///     .layer();
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    /// Validated when set, so each delivery can build its own maker (and random source).
    backoff: (Duration, Duration, f64),
    retry_if: Arc<Predicate>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("min", &self.backoff.0)
            .field("max", &self.backoff.1)
            .field("jitter", &self.backoff.2)
            .finish_non_exhaustive()
    }
}

impl RetryPolicy {
    /// Up to `max_attempts` handler runs per delivery (the first one included), with
    /// backoff from 100 ms doubling to 10 s, full jitter, retrying only retryable failures
    /// (transient errors and panics; permanent and decode failures go straight on).
    pub fn new(max_attempts: u32) -> Result<Self> {
        if max_attempts == 0 {
            return Err(Error::config(
                "max_attempts",
                "must be at least 1 (1 means no retry)",
            ));
        }
        Self {
            max_attempts,
            backoff: (Duration::ZERO, Duration::ZERO, 0.0),
            retry_if: Arc::new(HandlerError::is_retryable),
        }
        .backoff(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// Backoff doubling from `min` up to `max`, with full jitter.
    pub fn backoff(self, min: Duration, max: Duration) -> Result<Self> {
        self.backoff_with_jitter(min, max, 1.0)
    }

    /// Backoff doubling from `min` up to `max`; each delay gets up to `jitter` × itself
    /// added at random (0 = none, 1 = up to double), still capped at `max`.
    pub fn backoff_with_jitter(
        mut self,
        min: Duration,
        max: Duration,
        jitter: f64,
    ) -> Result<Self> {
        maker(min, max, jitter)?;
        self.backoff = (min, max, jitter);
        Ok(self)
    }

    /// Which failures to retry (default: [`HandlerError::is_retryable`]).
    pub fn retry_if(
        mut self,
        predicate: impl Fn(&HandlerError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retry_if = Arc::new(predicate);
        self
    }

    /// The most handler runs per delivery.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The layer applying this policy.
    pub fn layer(self) -> RetryLayer {
        RetryLayer {
            policy: Arc::new(self),
        }
    }

    /// A fresh backoff for one delivery, with its own random source.
    fn new_backoff(&self) -> ExponentialBackoff {
        let (min, max, jitter) = self.backoff;
        maker(min, max, jitter)
            .expect("validated when the policy was built")
            .make_backoff()
    }
}

fn maker(min: Duration, max: Duration, jitter: f64) -> Result<ExponentialBackoffMaker> {
    // `HasherRng::default()` seeds from a new `RandomState`: a different sequence each time.
    ExponentialBackoffMaker::new(min, max, jitter, HasherRng::default()).map_err(|e| {
        Error::config(
            "backoff",
            format!("{e}; give 0 < min <= max and 0 <= jitter <= 100"),
        )
    })
}

/// The in-process retry layer: wraps a handler in [`Retry`] with a [`RetryPolicy`].
#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`RetryLayer`] produces: runs the handler again after a retryable
/// failure, up to the policy's attempts, waiting out the backoff in between.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
}

impl<S> Service<Delivery> for Retry<S>
where
    S: Service<Delivery, Response = (), Error = HandlerError> + Clone,
{
    type Response = ();
    type Error = HandlerError;
    type Future = RetryFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        // The ready service runs this attempt; the future keeps a clone for the next
        // (tower's pattern: a clone must be polled ready before it is called).
        let handling = Caught::new(self.inner.call(delivery.clone()));
        RetryFuture {
            state: State::Handling { handling },
            service: self.inner.clone(),
            delivery,
            policy: self.policy.clone(),
            failures: None,
        }
    }
}

/// What one delivery's earlier failures left: built at the first failure.
struct Failures {
    attempts: u32,
    first: SystemTime,
    backoff: ExponentialBackoff,
}

pin_project! {
    /// The future of a [`Retry`] call.
    pub struct RetryFuture<S, F> {
        #[pin]
        state: State<F>,
        service: S,
        delivery: Delivery,
        policy: Arc<RetryPolicy>,
        // Boxed: the success path carries one word, not the backoff's state.
        failures: Option<Box<Failures>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Handling { #[pin] handling: Caught<F> },
        // Boxed: only a retry pays for the timer's size.
        Waiting { sleep: Pin<Box<tokio::time::Sleep>> },
        Readying,
    }
}

impl<S, F> Future for RetryFuture<S, F>
where
    S: Service<Delivery, Response = (), Error = HandlerError, Future = F>,
    F: Future<Output = Result<(), HandlerError>>,
{
    type Output = Result<(), HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Handling { handling } => {
                    let error = match ready!(handling.poll(cx)) {
                        Ok(()) => return Poll::Ready(Ok(())),
                        Err(error) => error,
                    };
                    let policy = &**this.policy;
                    let failures = this.failures.get_or_insert_with(|| {
                        Box::new(Failures {
                            attempts: 0,
                            first: error.first_failure(),
                            backoff: policy.new_backoff(),
                        })
                    });
                    failures.attempts += 1;
                    if failures.attempts < policy.max_attempts && (policy.retry_if)(&error) {
                        tracing::debug!(attempt = failures.attempts, error = %error, "retrying in process");
                        metrics::counter!("switchyard_retried_total", "topic" => this.delivery.topic().to_string())
                            .increment(1);
                        let sleep = Box::pin(failures.backoff.next_backoff());
                        this.state.set(State::Waiting { sleep });
                        continue;
                    }
                    // Giving up: say how many runs it took, for the dead-letter headers.
                    return Poll::Ready(Err(
                        error.with_retries(failures.attempts - 1, failures.first)
                    ));
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    if let Err(e) = ready!(this.service.poll_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let handling = Caught::new(this.service.call(this.delivery.clone()));
                    this.state.set(State::Handling { handling });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_delivery_draws_its_own_jitter() {
        // With the clock paused, equal delays give equal deadlines: tower's policy,
        // cloned per request, gave every delivery the same jitter sequence.
        let policy = RetryPolicy::new(3)
            .unwrap()
            // Not a whole number of seconds: tower's jitter scales the seconds and the
            // nanoseconds apart, truncating each, so 1 s + jitter is always 1 s.
            .backoff(Duration::from_millis(150), Duration::from_secs(60))
            .unwrap();
        let deadlines: std::collections::BTreeSet<_> = (0..5)
            .map(|_| policy.new_backoff().next_backoff().deadline())
            .collect();
        assert!(
            deadlines.len() > 1,
            "five deliveries, one delay: {deadlines:?}"
        );
    }
}
