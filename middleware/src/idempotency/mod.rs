//! Idempotent consumers (the seed's Q2): a message whose id was already handled by this
//! group is acked without running the handler again.
//!
//! The [`IdempotencyStore`] keeps one mark per `group/message-id`: *in flight* (with a
//! lease that expires, so a crashed consumer does not block the id forever) or
//! *completed* (kept for a retention period). [`IdempotencyLayer`]:
//!
//! - completed → skip the handler, succeed (the runtime acks the duplicate);
//! - in flight elsewhere → wait until it completes (then skip) or its lease lapses (then
//!   run): a duplicate never runs at the same time as the original;
//! - otherwise mark in flight, run the handler, then mark completed on success or release
//!   the mark on failure, so the redelivery can run.

mod layer;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;

use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::Result;

pub use layer::{Idempotency, IdempotencyFuture, IdempotencyLayer};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;

/// The answer to [`IdempotencyStore::begin`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Begin {
    /// Nobody handled it: it is now marked in flight for the caller.
    Started,
    /// Someone else holds an unexpired in-flight mark.
    InFlight,
    /// It was handled already.
    Completed,
}

/// Where idempotency marks live.
///
/// Stores that answer without waiting (in-process ones, like [`MemoryStore`]) also
/// implement the `try_` methods: the layer calls those first and awaits the async ones
/// only when they return `None`, which saves a boxed future per call on the hot path.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Marks `key` in flight for `lease` unless it is in flight (unexpired) or completed.
    async fn begin(&self, key: &str, lease: Duration) -> Result<Begin>;
    /// Marks `key` completed, remembered for `retention`.
    async fn complete(&self, key: &str, retention: Duration) -> Result<()>;
    /// Releases an in-flight mark (the handler failed; a redelivery may run).
    async fn abandon(&self, key: &str) -> Result<()>;

    /// [`begin`](IdempotencyStore::begin) without waiting, if this store can; `None`
    /// (the default) means "call `begin`".
    fn try_begin(&self, key: &str, lease: Duration) -> Option<Result<Begin>> {
        let _ = (key, lease);
        None
    }

    /// [`complete`](IdempotencyStore::complete) without waiting, if this store can;
    /// `None` (the default) means "call `complete`".
    fn try_complete(&self, key: &str, retention: Duration) -> Option<Result<()>> {
        let _ = (key, retention);
        None
    }

    /// [`abandon`](IdempotencyStore::abandon) without waiting, if this store can;
    /// `None` (the default) means "call `abandon`".
    fn try_abandon(&self, key: &str) -> Option<Result<()>> {
        let _ = key;
        None
    }
}
