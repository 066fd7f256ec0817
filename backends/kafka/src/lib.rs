//! # switchyard-kafka
//!
//! The Apache Kafka backend of switchyard, on [rdkafka](https://docs.rs/rdkafka)
//! (librdkafka, bundled). Connect with a URL:
//!
//! ```no_run
//! # async fn demo() -> switchyard_core::Result<()> {
//! let broker = switchyard_kafka::connect("kafka://127.0.0.1:9092?partitions=8&security.protocol=PLAINTEXT").await?;
//! # let _ = broker; Ok(()) }
//! ```
//!
//! Settings are listed on [`KafkaConfig`]; names with a dot go to librdkafka as they are.
//!
//! ## Producer
//! - The message key is the record key: the same key always lands on the same partition
//!   (librdkafka's `murmur2_random` partitioner, the Java client's), in publish order
//!   (idempotent producer). Messages without a key are spread across partitions.
//! - The message id travels in the record header [`headers::ID`] (`switchyard-id`); every
//!   application header (the `content-type` one included) is a record header of the same
//!   name. A record written by another client, without `switchyard-id`, is consumed with
//!   the id `kafka:<topic>:<partition>:<offset>`.
//! - `acks=all` and the idempotent producer by default; `delivery=at-most-once` gives
//!   `acks=0`. `publish` resolves with the partition and offset once acknowledged;
//!   `publish_batch` hands every record to librdkafka, then awaits all acknowledgements.
//!   A message over `max_message_size` is refused with `Error::MessageTooLarge` without
//!   failing the rest of its batch: the other messages are published, then the batch
//!   returns the error naming the refused one.
//! - Missing topics are created with `partitions` (8) and `replication` (1); with
//!   `create_topics=false` a missing topic is an [`Error::Config`](switchyard_core::Error::Config).
//!
//! ## Consumer
//! Start at the earliest or latest offset (`StartFrom`), or move a stopped group to an
//! offset or a time with [`KafkaBroker::replay`].
//!
//! Each `subscribe` is one member of the consumer group `group.id = group`, with its own
//! librdkafka consumer polled by a dedicated thread. `subscribe` returns once the member
//! has its first assignment (possibly empty), so a `StartFrom::Latest` member sees every
//! message published after `subscribe` returns.
//!
//! - **Ordering.** A record with a key is not handed out while an earlier record with
//!   the same key is unsettled in this member; since a key lives on one partition, and a
//!   partition on one member, same-key messages run one at a time in offset order even
//!   when the runtime handles a subscription's deliveries concurrently. Different keys
//!   and unkeyed records run in parallel, up to `prefetch` unsettled at once.
//! - **Commits after processing.** A partition's commit position is its lowest offset
//!   not yet done, so handlers finishing out of order never commit past an unfinished
//!   message. `commit=periodic` (default) commits it every `commit_interval_ms`;
//!   `commit=sync` commits before each ack returns; `commit=auto` takes at-most-once
//!   consumers only. A consumer with `Guarantee::AtMostOnce` commits as `commit=sync`,
//!   before its handler runs: a crash loses what was being handled, never duplicates.
//! - **Nack.** Kafka has no per-message nack. `Nack::Requeue` redelivers the record in
//!   process with `delivery_count + 1`; its key stays blocked, so later same-key records
//!   still wait behind it, and its offset stays uncommitted until it is acked. The
//!   trade-off: delivery counts are kept in memory only (`durable_delivery_counts:
//!   false`) — after a crash or a rebalance the message comes back with delivery count 1
//!   — and a message nacked forever holds its partition's commit position back (records
//!   after it are still handled, but would be redelivered after a restart); bound
//!   retries with the retry/dead-letter middleware. `Nack::Reject` counts as done: the
//!   commit moves past it (logged).
//! - **Rebalance.** On revocation the member stops handing out the revoked partitions'
//!   records, waits up to `revoke_timeout_ms` for their in-flight messages, commits
//!   what finished and lets the partitions go; settling one of their deliveries later
//!   returns `Error::SubscriptionClosed` and commits nothing (the next owner redelivers).
//! - **Close** commits what finished and leaves the group, so the partitions move at
//!   once; unsettled deliveries are redelivered by the next owner. A member dropped
//!   without `close` does the same in the background; one whose process dies is evicted
//!   after `session.timeout.ms` (6 s by default here), and its uncommitted messages go
//!   to the others: nothing is lost, duplicates stay within the uncommitted window.
//!
//! ## Request/reply
//! `Broker::request` gets its replies on a topic of this client's own,
//! `sy.reply.<random>` (one partition), read by assignment (no group join); a reply is a
//! record produced to its partition 0, and only to a `sy.reply.` topic that exists.
//! `close` keeps the topic (see docs/backends/kafka.md); a process with a stable
//! identity reuses one with [`KafkaBroker::set_reply_topic`].
//!
//! ## Brokers
//! Tested against tansu 0.6 (sqlite storage). Its group coordinator can hand a partition
//! to a new member before the old one let go, hence `assign_delay_ms` (see
//! [`KafkaConfig`]); set it to 0 on Apache Kafka. tansu never creates topics on its own,
//! which is why switchyard creates them (`create_topics`).
#![forbid(unsafe_code)]
// docs.rs (nightly) marks feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

mod acker;
mod admin;
mod broker;
mod client;
mod config;
mod context;
mod fetching;
mod poll;
#[cfg(feature = "tls")]
mod probe;
mod publisher;
mod rebalance;
mod record;
mod rpc;
mod schedule;
mod state;
mod subscription;

use std::sync::Arc;

use switchyard_core::{AnyBroker, Result};

pub use admin::ReplayFrom;
pub use broker::KafkaBroker;
pub use config::{CommitStrategy, DeliveryGuarantee, KafkaConfig};
pub use context::{KafkaContext, KafkaProblem, KafkaRefused};

/// Header names the Kafka backend writes on every record.
pub mod headers {
    /// The record header carrying the switchyard message id. Every other application
    /// header travels as a record header of the same name (the `content-type` header
    /// included), with its value as UTF-8 bytes.
    pub const ID: &str = "switchyard-id";
}

/// Connects to Kafka from a `kafka://host:port[,host:port][?setting=value]` URL
/// (settings on [`KafkaConfig`]).
pub async fn connect(url: &str) -> Result<AnyBroker> {
    Ok(Arc::new(KafkaBroker::connect(url)?))
}

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use switchyard_core::Message;

    /// A consumed record's parts decoded as a message, as the consumer does.
    pub fn decode_record(
        (topic, partition, offset): (&str, i32, i64),
        key: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        payload: Option<&[u8]>,
        timestamp_ms: Option<i64>,
    ) -> Message {
        crate::record::decode(crate::record::Record {
            topic,
            partition,
            offset,
            key,
            headers: headers.iter().copied(),
            payload,
            timestamp_ms,
        })
    }

    /// The record headers `message` is published with, in order.
    pub fn record_headers(message: &Message) -> Vec<(String, Option<Vec<u8>>)> {
        use rdkafka::message::Headers as _;
        crate::record::headers(message)
            .iter()
            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
            .collect()
    }
}
