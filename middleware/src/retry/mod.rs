//! In-process retry with exponential backoff, jitter and a cap (the seed's section 7).
//!
//! Built on `tower::retry`: [`RetryPolicy`] is a `tower::retry::Policy` and its backoff
//! is tower's `ExponentialBackoff`, so there is no hand-rolled timing here. A retried
//! delivery keeps its place: it holds one concurrency slot and its key (later same-key
//! messages wait, other keys flow on), and it is never nacked between attempts.

mod tiers;

pub use tiers::{
    RetryTiers, RetryTopic, RetryTopicLayer, Tiered, DUE_HEADER, ERROR_HEADER, ORIGIN_HEADER,
    ORIGIN_OFFSET_HEADER, ORIGIN_PARTITION_HEADER, TIER_HEADER,
};

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use switchyard_core::{Delivery, Error, HandlerError, Result};
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::Policy;
use tower::util::rng::HasherRng;

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
    maker: ExponentialBackoffMaker,
    retry_if: Arc<Predicate>,
    // Per-delivery state: tower clones the policy for each request.
    attempts: u32,
    backoff: Option<ExponentialBackoff>,
    first_failure: Option<SystemTime>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.maker)
            .finish_non_exhaustive()
    }
}

/// The retry layer: `tower::retry::RetryLayer` with a [`RetryPolicy`].
pub type RetryLayer = tower::retry::RetryLayer<RetryPolicy>;

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
        Ok(Self {
            max_attempts,
            maker: maker(Duration::from_millis(100), Duration::from_secs(10), 1.0)?,
            retry_if: Arc::new(HandlerError::is_retryable),
            attempts: 0,
            backoff: None,
            first_failure: None,
        })
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
        self.maker = maker(min, max, jitter)?;
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
        tower::retry::RetryLayer::new(self)
    }
}

fn maker(min: Duration, max: Duration, jitter: f64) -> Result<ExponentialBackoffMaker> {
    ExponentialBackoffMaker::new(min, max, jitter, HasherRng::default()).map_err(|e| {
        Error::config(
            "backoff",
            format!("{e}; give 0 < min <= max and 0 <= jitter <= 100"),
        )
    })
}

impl Policy<Delivery, (), HandlerError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Delivery,
        result: &mut Result<(), HandlerError>,
    ) -> Option<Self::Future> {
        let Err(error) = result else {
            return None;
        };
        self.attempts += 1;
        let first = *self.first_failure.get_or_insert(error.first_failure());
        if self.attempts < self.max_attempts && (self.retry_if)(error) {
            tracing::debug!(attempt = self.attempts, error = %error, "retrying in process");
            metrics::counter!("switchyard_retried_total", "topic" => req.topic().to_string())
                .increment(1);
            let maker = &mut self.maker;
            return Some(
                self.backoff
                    .get_or_insert_with(|| maker.make_backoff())
                    .next_backoff(),
            );
        }
        // Giving up: say how many runs it took, for the dead-letter headers.
        let retries = self.attempts - 1;
        if let Err(e) = std::mem::replace(result, Ok(())) {
            *result = Err(e.with_retries(retries, first));
        }
        None
    }

    fn clone_request(&mut self, req: &Delivery) -> Option<Delivery> {
        Some(req.clone())
    }
}
