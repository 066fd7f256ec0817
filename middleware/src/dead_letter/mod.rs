//! The dead-letter queue: where a message goes after its last failure, with why, and an
//! API to read dead letters and send chosen ones back to their original topic.
//!
//! [`DeadLetterLayer`] publishes a failed message to `<topic>.dlq` (configurable) with
//! the failure in headers, and only then lets the original be acked; if that publish
//! fails, the original is nacked, so nothing is lost. [`DeadLetterAdmin`] lists dead
//! letters as [`DeadLetterRecord`]s and replays chosen ones.
//!
//! Headers added to a dead letter (all strings; times are RFC 3339 UTC):
//!
//! | header | value |
//! |---|---|
//! | `x-dlq-error` | the error's text |
//! | `x-dlq-error-kind` | `transient`, `permanent`, `decode` or `panic` |
//! | `x-dlq-deliveries` | deliveries by the broker, the last one included |
//! | `x-dlq-retries` | in-process retries within the last delivery |
//! | `x-dlq-original-topic`, `x-dlq-original-group` | where it was consumed |
//! | `x-dlq-original-partition`, `x-dlq-original-offset` | where the backend has them |
//! | `x-dlq-first-failure`, `x-dlq-last-failure` | the last delivery's first failed attempt, and its last |
//! | `x-dlq-original-key` | the message key (the dead letter itself has none) |
//!
//! The message keeps its id, payload and headers, so a replayed message is the same
//! message to the idempotency layer. Its key moves to a header: dead letters have nothing
//! to keep in order, and a keyless dead letter is never held back behind another one with
//! the same key while a reader lists without acking. Replay puts the key back.

mod future;
mod layer;
mod letter;
mod record;
mod replay;
mod service;

pub use future::DeadLetterFuture;
pub use layer::DeadLetterLayer;
pub use record::{DeadLetterRecord, Selection};
pub use replay::{DeadLetterAdmin, ReplayTo, Replayed};
pub use service::DeadLetter;

/// Header names written to dead letters.
pub mod headers {
    /// The error's text.
    pub const ERROR: &str = "x-dlq-error";
    /// The failure kind.
    pub const ERROR_KIND: &str = "x-dlq-error-kind";
    /// Deliveries by the broker, the last one included.
    pub const DELIVERIES: &str = "x-dlq-deliveries";
    /// In-process retries within the last delivery.
    pub const RETRIES: &str = "x-dlq-retries";
    /// The original topic.
    pub const ORIGINAL_TOPIC: &str = "x-dlq-original-topic";
    /// The group that failed to handle it.
    pub const ORIGINAL_GROUP: &str = "x-dlq-original-group";
    /// The original partition.
    pub const ORIGINAL_PARTITION: &str = "x-dlq-original-partition";
    /// The original offset.
    pub const ORIGINAL_OFFSET: &str = "x-dlq-original-offset";
    /// When the last delivery's first attempt failed.
    pub const FIRST_FAILURE: &str = "x-dlq-first-failure";
    /// When its last attempt failed.
    pub const LAST_FAILURE: &str = "x-dlq-last-failure";
    /// The original message key.
    pub const ORIGINAL_KEY: &str = "x-dlq-original-key";
    /// Set when the message's own headers had to be left out for the dead letter to be
    /// accepted (the broker refused it whole): how many, and why.
    pub const HEADERS_DROPPED: &str = "x-dlq-headers-dropped";

    /// Every dead-letter header, removed again on replay.
    pub const ALL: &[&str] = &[
        ERROR,
        ERROR_KIND,
        DELIVERIES,
        RETRIES,
        ORIGINAL_TOPIC,
        ORIGINAL_GROUP,
        ORIGINAL_PARTITION,
        ORIGINAL_OFFSET,
        FIRST_FAILURE,
        LAST_FAILURE,
        ORIGINAL_KEY,
        HEADERS_DROPPED,
    ];
}

/// The default dead-letter topic of a topic: `<topic>.dlq`.
pub fn default_dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}
