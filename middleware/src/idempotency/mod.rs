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
//!
//! The layer trusts the producer's id: two messages published with the same id are one
//! message to it, and the second is skipped. switchyard's publishers give each message a
//! fresh UUIDv7 unless you set one, and no header can override it (names starting with
//! `switchyard-` or `x-switchyard-` are refused on publish). Other clients choose their
//! own ids: on RabbitMQ the id is the AMQP `message_id` property by design, on Kafka the
//! one `switchyard-id` record header (a record with none, an empty one or several gets
//! an id from its topic, partition and offset, which no other record shares).

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

/// A mark's key in its two parts: the consumer group and the message id. Joined,
/// `<group>/<id>` is the key the `&str` methods take, and the same mark: the layer
/// hands the parts to the `_noted` methods, so an in-process store can file a key
/// without joining it into a new string per message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkKey<'a> {
    /// The consumer group (its name has no `/`).
    pub group: &'a str,
    /// The message id.
    pub id: &'a str,
}

impl MarkKey<'_> {
    /// `<group>/<id>`: the key as the `&str` methods take it.
    pub fn joined(&self) -> String {
        let mut key = String::with_capacity(self.group.len() + 1 + self.id.len());
        key.push_str(self.group);
        key.push('/');
        key.push_str(self.id);
        key
    }
}

impl std::fmt::Display for MarkKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.group, self.id)
    }
}

/// Where a store put a mark: returned with the answer of
/// [`IdempotencyStore::try_begin_noted`] and handed back to
/// [`try_complete_noted`](IdempotencyStore::try_complete_noted) or
/// [`try_abandon_noted`](IdempotencyStore::try_abandon_noted) for the same key, so an
/// in-process store finds the mark again without hashing and looking up the key twice.
/// Opaque; a store that has no use for it gives [`MarkNote::default`] and ignores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkNote {
    /// The store that wrote it (0: none).
    pub(crate) store: u64,
    pub(crate) at: u64,
    pub(crate) check: u64,
    /// A cheap sketch of the key it was given for, so a note handed back with another
    /// key is (almost always) noticed and ignored rather than trusted.
    pub(crate) key: u64,
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

    /// [`try_begin`](IdempotencyStore::try_begin) for `key`'s joined form, and a note
    /// of where the mark is for the calls that finish it. The default joins the key
    /// and gives an empty note.
    fn try_begin_noted(
        &self,
        key: MarkKey<'_>,
        lease: Duration,
    ) -> Option<Result<(Begin, MarkNote)>> {
        self.try_begin(&key.joined(), lease)
            .map(|begun| begun.map(|begin| (begin, MarkNote::default())))
    }

    /// [`try_complete`](IdempotencyStore::try_complete) with the note
    /// [`try_begin_noted`](IdempotencyStore::try_begin_noted) gave for `key`. The
    /// default ignores the note.
    fn try_complete_noted(
        &self,
        key: MarkKey<'_>,
        note: MarkNote,
        retention: Duration,
    ) -> Option<Result<()>> {
        let _ = note;
        self.try_complete(&key.joined(), retention)
    }

    /// [`try_abandon`](IdempotencyStore::try_abandon) with the note
    /// [`try_begin_noted`](IdempotencyStore::try_begin_noted) gave for `key`. The
    /// default ignores the note.
    fn try_abandon_noted(&self, key: MarkKey<'_>, note: MarkNote) -> Option<Result<()>> {
        let _ = note;
        self.try_abandon(&key.joined())
    }
}
