//! # switchyard-middleware
//!
//! `tower` layers around switchyard handlers. A handler is a
//! `tower::Service<Delivery, Response = (), Error = HandlerError>`; each layer here wraps
//! one and is one, so they compose with `tower::ServiceBuilder`:
//!
//! - [`RetryPolicy`] / [`RetryLayer`]: in-process retry, exponential backoff with jitter
//!   and a cap, only for retryable failures (tower's backoff underneath);
//! - [`RetryTiers`] / [`RetryTopicLayer`]: non-blocking retry through delay tiers
//!   (`<topic>.retry.<n>` topics and forwarders), so a failing key does not hold up others;
//! - [`DeadLetterLayer`]: after the last failure, publish to `<topic>.dlq` with the
//!   failure in headers, ack only once that publish is confirmed; [`DeadLetters`] lists
//!   and replays them;
//! - [`IdempotencyLayer`]: a message id runs once per group ([`MemoryStore`], or
//!   `PostgresStore` with the `postgres` feature);
//! - [`InspectLayer`]: observe every outcome.
//!
//! ## Order
//!
//! ```text
//! ServiceBuilder::new()
//!     .layer(dead_letter)   // outermost: sees only the final outcome
//!     .layer(idempotency)   // a dead-lettered message is *not* marked done, so a replay runs
//!     .layer(retry)         // innermost: retries run under one idempotency mark
//!     .service(handler)
//! ```
//!
//! - Dead letter outside idempotency: a failure releases the idempotency mark before it is
//!   dead-lettered, so replaying it (same id) runs the handler once more; were it inside,
//!   the dead-lettered message would count as done and its replay be skipped.
//! - Retry inside idempotency: one mark covers all in-process attempts, so a duplicate
//!   arriving meanwhile waits instead of running alongside.
//! - Retry inside dead letter: only the final failure is dead-lettered, with the retry
//!   count and the first failure time in its headers.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_core::{handler_fn, Delivery, HandlerError};
//! use switchyard_middleware::{DeadLetterLayer, IdempotencyLayer, MemoryStore, RetryPolicy};
//! use tower::ServiceBuilder;
//!
//! let broker = Arc::new(switchyard_memory::MemoryBroker::new());
//! let service = ServiceBuilder::new()
//!     .layer(DeadLetterLayer::new(broker.clone()))
//!     .layer(IdempotencyLayer::new(Arc::new(MemoryStore::default())))
//!     .layer(RetryPolicy::new(3).unwrap().backoff(Duration::from_millis(50), Duration::from_secs(2)).unwrap().layer())
//!     .service(handler_fn(|d: Delivery| async move {
//!         println!("{}", d.id());
//!         Ok::<_, HandlerError>(())
//!     }));
//! # let _ = service;
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod dead_letter;
pub mod idempotency;
mod inspect;
mod recover;
pub mod retry;

pub use dead_letter::{
    DeadLetterLayer, DeadLetterRecord, DeadLetters, ReplayTo, Replayed, Selection,
};
#[cfg(feature = "postgres")]
pub use idempotency::PostgresStore;
pub use idempotency::{Begin, IdempotencyLayer, IdempotencyStore, MarkKey, MemoryStore};
pub use inspect::{Inspect, InspectLayer};
pub use recover::{Caught, OnFailure, Recover, RecoverFuture};
pub use retry::{Retry, RetryFuture, RetryLayer, RetryPolicy, RetryTiers, RetryTopicLayer};
