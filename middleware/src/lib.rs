//! # switchyard-middleware
//!
//! `tower` layers around switchyard handlers. A handler is a
//! `tower::Service<Delivery, Response = (), Error = HandlerError>`; each layer here wraps
//! one and is one, so they compose with `tower::ServiceBuilder`:
//!
//! - [`RetryLayer::new`]`(`[`RetryPolicy`]`)`: in-process retry, exponential backoff with
//!   jitter and a cap, only for retryable failures (tower's retry underneath);
//! - [`RetryTiersLayer::new`]`(`[`RetryTiers`]`)`: non-blocking retry through delay tiers
//!   (`<topic>.<group>.retry.<n>` topics, or the broker's own delays), so a failing key
//!   does not hold up others;
//! - [`DeadLetterLayer::new`]`(publisher)`: after the last failure, publish to
//!   `<topic>.dlq` with the failure in headers, ack only once that publish is confirmed;
//!   [`DeadLetterAdmin`] lists dead letters and replays chosen ones;
//! - [`IdempotencyLayer::new`]`(store)`: a message id runs once per group
//!   ([`MemoryStore`], or `PostgresStore` with the `postgres` feature);
//! - [`InspectLayer::new`]`(observer)`: observe every outcome.
//!
//! Each lives in its own module with the same inner layout (`mod`: the policy and the
//! docs; `layer`, `service`, `future`), in the shape of tower's own middleware. Their
//! headers are constants in a `headers` module each ([`dead_letter::headers`],
//! [`retry_tiers::headers`]).
//!
//! One word per concept: a **delivery** is one hand-over of a message by the broker
//! (counted by `Delivery::delivery_count`); an **attempt** is one run of the handler
//! within a delivery; a **retry** is an attempt after the first.
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
//! - Retry inside dead letter: only the final failure is dead-lettered, with the retries
//!   and the first failure time in its headers.
//!
//! ```
//! # fn main() -> switchyard_core::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_core::{handler_fn, Delivery, HandlerError};
//! use switchyard_middleware::{DeadLetterLayer, IdempotencyLayer, MemoryStore, RetryLayer, RetryPolicy};
//! use tower::ServiceBuilder;
//!
//! let broker = Arc::new(switchyard_memory::MemoryBroker::new());
//! let service = ServiceBuilder::new()
//!     .layer(DeadLetterLayer::new(broker.clone()))
//!     .layer(IdempotencyLayer::new(Arc::new(MemoryStore::default())))
//!     .layer(RetryLayer::new(
//!         RetryPolicy::new(3)?.backoff(Duration::from_millis(50), Duration::from_secs(2))?,
//!     ))
//!     .service(handler_fn(|d: Delivery| async move {
//!         println!("{}", d.id());
//!         Ok::<_, HandlerError>(())
//!     }));
//! # let _ = service;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
// docs.rs (nightly) marks feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

mod catch;
pub mod dead_letter;
pub mod idempotency;
mod inspect;
mod recover;
pub mod retry;
pub mod retry_tiers;

pub use dead_letter::{
    DeadLetter, DeadLetterAdmin, DeadLetterFuture, DeadLetterLayer, DeadLetterRecord, ReplayTo,
    Replayed, Selection,
};
pub use idempotency::{
    Begin, Idempotency, IdempotencyFuture, IdempotencyLayer, IdempotencyStore, MarkKey, MemoryStore,
};
#[cfg(feature = "postgres")]
pub use idempotency::{PostgresStore, PostgresTlsProblem, PostgresTlsRefused};
pub use inspect::{Inspect, InspectLayer};
pub use retry::{Retry, RetryFuture, RetryLayer, RetryPolicy};
pub use retry_tiers::{
    RetryTiers, RetryTiersFuture, RetryTiersInbound, RetryTiersLayer, RetryTiersService,
};
