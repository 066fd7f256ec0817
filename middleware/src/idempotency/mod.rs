//! Idempotent consumers: a message whose id was already handled by this
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
//!
//! A store that fails to answer (a PostgreSQL restart, a network cut) is an outage, not
//! the message's fault: the layer holds the delivery and asks the store again, with
//! jittered backoff and a bound on each try, until it answers or the delivery is dropped
//! (shutdown). A completed mark whose recording failed is recorded again, never given
//! up, so an outage cannot make the handler succeed twice for one id.
//!
//! The layer trusts the producer's id: two messages published with the same id are one
//! message to it, and the second is skipped. switchyard's publishers give each message a
//! fresh UUIDv7 unless you set one, and no header can override it (names starting with
//! `switchyard-` or `x-switchyard-` are refused on publish). Other clients choose their
//! own ids: on RabbitMQ the id is the AMQP `message_id` property by design, on Kafka the
//! one `switchyard-id` record header (a record with none, an empty one or several gets
//! an id from its topic, partition and offset, which no other record shares).

mod future;
mod layer;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod service;

use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::Result;

pub use future::IdempotencyFuture;
pub use layer::IdempotencyLayer;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresStore, PostgresTlsProblem, PostgresTlsRefused};
pub use service::Idempotency;

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

/// A mark's key: the consumer group and the message id. The same id in two groups is
/// two marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MarkKey<'a> {
    /// The consumer group (its name has no `/`).
    pub group: &'a str,
    /// The message id.
    pub id: &'a str,
}

impl<'a> MarkKey<'a> {
    /// The key of message `id` in `group`.
    pub fn new(group: &'a str, id: &'a str) -> Self {
        Self { group, id }
    }
}

impl std::fmt::Display for MarkKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.group, self.id)
    }
}

/// Where idempotency marks live.
///
/// Every error a store returns is taken for an outage: [`IdempotencyLayer`] holds the
/// delivery and calls again later, so a store should fail only when it could not answer.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Marks `key` in flight for `lease` unless it is in flight (unexpired) or completed.
    async fn begin(&self, key: MarkKey<'_>, lease: Duration) -> Result<Begin>;
    /// Marks `key` completed, remembered for `retention`, whatever mark it had (none
    /// included). Doing it twice is the same as doing it once.
    async fn complete(&self, key: MarkKey<'_>, retention: Duration) -> Result<()>;
    /// Releases an in-flight mark (the handler failed; a redelivery may run). A
    /// completed mark stays; doing it twice is the same as doing it once.
    async fn release(&self, key: MarkKey<'_>) -> Result<()>;
}
