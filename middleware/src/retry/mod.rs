//! In-process retry with exponential backoff, jitter and a cap.
//!
//! Words, used the same way across this crate: a **delivery** is one hand-over of a
//! message by the broker (counted by [`Delivery::delivery_count`](switchyard_core::Delivery));
//! an **attempt** is one run of the handler within a delivery; a **retry** is an attempt
//! after the first. [`RetryPolicy::new`] takes the most attempts per delivery.
//!
//! The service is tower's [`tower::retry::Retry`] with a policy of ours: tower clones
//! the policy for each delivery, and each clone counts that delivery's retries and draws
//! every pause afresh from [`Backoff`] (jittered into the upper half of each step), so
//! deliveries that fail together do not retry together. The pause is boxed, so the
//! success path carries no timer.
//!
//! A retried delivery keeps its place: it holds one concurrency slot and its key (later
//! same-key messages wait, other keys flow on), and it is never nacked between attempts.
//! A handler that panics counts as a retryable failure, like a transient error.
//!
//! ```
//! use std::time::Duration;
//! use switchyard_middleware::{RetryLayer, RetryPolicy};
//! let policy = RetryPolicy::new(5)
//!     .unwrap()
//!     .backoff(Duration::from_millis(100), Duration::from_secs(10))
//!     .unwrap();
//! let layer = RetryLayer::new(policy);
//! # let _ = layer;
//! ```

mod future;
mod layer;
mod service;

pub use future::RetryFuture;
pub use layer::RetryLayer;
pub use service::Retry;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::backend::Backoff;
use switchyard_core::{Error, HandlerError, Result};

type Predicate = dyn Fn(&HandlerError) -> bool + Send + Sync;

/// When and how often to retry a failed handler in process.
#[derive(Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    backoff: Backoff,
    retry_if: Arc<Predicate>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl RetryPolicy {
    /// Up to `max_attempts` attempts per delivery (the first one included), with pauses
    /// doubling from 100 ms to 10 s, retrying only retryable failures (transient errors
    /// and panics; permanent and decode failures go straight on).
    pub fn new(max_attempts: u32) -> Result<Self> {
        if max_attempts == 0 {
            return Err(Error::config(
                "max_attempts",
                "must be at least 1 (1 means no retry)",
            ));
        }
        Ok(Self {
            max_attempts,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            retry_if: Arc::new(HandlerError::is_retryable),
        })
    }

    /// Pauses doubling from `min` up to `max`, each drawn at random from the upper half
    /// of its step. Fails when `min` exceeds `max`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Result<Self> {
        if min > max {
            return Err(Error::config(
                "backoff",
                format!("min {min:?} exceeds max {max:?}"),
            ));
        }
        self.backoff = Backoff::new(min, max);
        Ok(self)
    }

    /// Which failures to retry (default: [`HandlerError::is_retryable`]).
    #[must_use]
    pub fn retry_if(
        mut self,
        predicate: impl Fn(&HandlerError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retry_if = Arc::new(predicate);
        self
    }

    /// The most attempts per delivery.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}
