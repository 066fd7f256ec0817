//! # switchyard-rabbitmq
//!
//! The RabbitMQ backend, on [lapin](https://docs.rs/lapin) 4. Connect with
//! `amqp://user:pass@host:5672/vhost` (or `amqps://`); settings go in the query string
//! (see [`RabbitConfig`]).
//!
//! ## Topology
//!
//! | switchyard | RabbitMQ |
//! |---|---|
//! | topic `T` | durable **direct exchange** `T` |
//! | group `G` of `T` | `partitions` durable classic queues `T:G.p0` … `T:G.p{n-1}`, each bound to `T` once per slot it owns (1024 bindings per group) |
//! | group membership | durable classic queue `T:G.members`; each member consumes it (no messages ever go there); its `x-max-length` records the partition count |
//! | partition ownership | one **exclusive consumer** per partition queue, on the owning member's connection |
//! | point-to-point `queue(N)` | topic `N`, group `N`: queues `N:N.p{i}` |
//!
//! (`:` cannot appear in topic or group names, so different pairs never share a
//! queue; `T:G` longer than 220 bytes is cut to 200 bytes plus a hash, as AMQP names hold
//! 255 bytes.) Everything is declared idempotently at subscribe time, and the exchange
//! at publish time, on throwaway channels: an object that already exists with other
//! settings is a permanent [`Error::Backend`](switchyard_core::Error::Backend) whose source is a [`DeclareConflict`]
//! naming it: an exchange of another type under a topic's name, say. Deleting that
//! exchange is the fix; the group's partition queues keep their messages, and the next
//! subscribe or publish declares the exchange and binds them again.
//!
//! ## Per-key order with competing members
//!
//! A publisher hashes the key (FNV-1a) to one of 1024 slots and sends the slot number
//! as the routing key (`"497"`); partition `i` of `n` (a power of two) is bound to the
//! slots `s` with `s % n == i`. So a key always lands in the same partition of every
//! group, publishers need not know partition counts, and unkeyed messages go
//! round-robin over the slots. A direct exchange matches a routing key with one
//! lookup, where a topic exchange with `#.<bits>` patterns costs publishers 2.5–3×
//! (raw lapin, persistent messages with confirms; `bench -- --topologies` measures it).
//! RabbitMQ's consistent-hash exchange is a plugin, measured no faster than slot
//! bindings, and routes each message to one queue of all those bound to it, so every
//! group would need an exchange of its own behind the topic's.
//!
//! Each partition is consumed by **one member at a time**, through an exclusive
//! consumer (RabbitMQ refuses a second one, and drops it with its channel or connection,
//! so a dead member's partitions are free at once). Every `rebalance_ms` a member counts
//! the group's members (the consumer count of `T:G.members`) and claims free partitions
//! up to its fair share `ceil(partitions / members)`, or gives up the ones above it: a
//! partition given up first stops handing out messages, waits (up to 30 s) for its
//! in-flight ones to be settled, then closes its channel (its prefetched messages go
//! back to their places at the queue head, and the exclusive consumer ends, in one
//! step; never `basic.cancel` first, which frees the queue for another member while the
//! messages are still out, so it would get later ones first). Inside a member, a key gate holds back a message while an earlier one with the
//! same key is unsettled, so a subscription's deliveries may run concurrently while
//! same-key messages run one at a time, in publish order. At most `partitions` members
//! of a group do work at once.
//!
//! Prefetch: each owned partition's channel has `basic_qos(prefetch)`, and the
//! subscription hands out at most `prefetch` unsettled deliveries in all; the rest wait
//! in the member (at most `prefetch` per owned partition).
//!
//! ## Publishing
//!
//! Publisher confirms are always on: `publish` resolves once the broker confirmed;
//! `publish_batch` sends the whole batch and then waits for the confirms (up to 4096
//! outstanding). Messages are persistent and mandatory: a message no group queue takes
//! comes back as an error whose source is [`Unroutable`] (RabbitMQ keeps messages only
//! for groups that already exist, so subscribe before publishing). The message id is
//! the AMQP `message_id`, the key the `x-switchyard-key` header, the headers the
//! `headers` table (strings), `content-type` also the `content_type` property, and the
//! timestamp the `timestamp` property (seconds). A message another client published
//! without a `message_id` gets an id derived from its payload, headers and properties,
//! the same on every delivery (so requeues and duplicates are recognised); two
//! publishes equal in all of those share it.
//!
//! ## Delayed redelivery
//!
//! [`Broker::redeliver_after`](switchyard_core::Broker::redeliver_after) needs no plugin: group `G` of `T` gets a hold queue
//! `T:G.delay.<ms>` per delay, with `x-message-ttl = ms` and `x-dead-letter-exchange =
//! T:G.return`, fed through a fanout exchange of the same name. The message goes in with
//! the routing key a publish would give it (its slot number); on expiry RabbitMQ
//! dead-letters it with that routing key to `T:G.return`, a direct exchange that binds
//! the group's partition queues to the same slots as `T` does: the message comes back to `G`
//! only, in its key's partition, with its id, key, headers and payload unchanged (the
//! `x-first-death-*` headers the broker adds are dropped on receipt, its `x-death`
//! table is never a header). It arrives with delivery count 1: the hold queue is a new
//! delivery. Dead-lettering from classic queues is at-most-once inside the broker (no
//! internal publisher confirms, <https://www.rabbitmq.com/docs/dlx#safety>): the hold
//! queue drops the message as soon as it has handed it on. On one node the partition
//! queues are local and always there, so only a crash of the node at the instant of
//! expiry could lose it; in a cluster, a message expiring while its partition queue's
//! node is down or cut off is lost. (Quorum queues dead-letter at least once, but give
//! up the exclusive consumers the partitions rely on.)
//!
//! ## Listing topics
//!
//! AMQP cannot list objects, so [`Broker::topics`](switchyard_core::Broker::topics) asks the management plugin's HTTP API
//! (`GET /api/exchanges/<vhost>` and `/api/queues/<vhost>`) at `management_url`
//! (default `http://<amqp host>:15672`, basic auth with the AMQP URL's user and
//! password): every direct exchange is a topic, every set of partition queues `T:G.p<i>`
//! a group, and a group's lag is read as [`Broker::lag`](switchyard_core::Broker::lag) reads it. Without the plugin
//! the error names it: `rabbitmq-plugins enable rabbitmq_management`.
//!
//! ## Consuming, delivery counts, dead letters
//!
//! Each owned partition has its own channel; the member's `prefetch` is split over them
//! as per-channel `basic.qos` limits (RabbitMQ's `global` qos, which is per channel and
//! can be changed under a running consumer), recomputed as partitions come and go. So
//! what a member holds, received and not yet handed out plus handed out and unsettled,
//! stays within `max(prefetch, partitions it owns)` (each channel needs a limit of at
//! least 1), and it hands out at most `prefetch` unsettled deliveries. A channel's limit
//! is not lowered below what it holds, and lowering recalls nothing: right after a
//! member gains partitions it may hold its earlier share until that is settled. Ack after processing;
//! `Nack::Requeue` is `basic.nack(requeue)` — the message goes back to its place at the
//! queue head and comes straight back, ahead of its key's successors (which the key
//! gate holds until then); `Nack::Reject` is `basic.reject` (dead-lettered to
//! `dead_letter_exchange` when set).
//!
//! Delivery counts: classic queues only flag a redelivery (and flag prefetched messages
//! that were never handed out too, when a partition changes hands), so the member counts
//! the deliveries of the messages it requeued itself: 1, 2, 3... A message that comes back
//! for another reason (a member closed, died or lost its connection with it unsettled)
//! starts again at 1. So [`Capabilities::durable_delivery_counts`](switchyard_core::Capabilities::durable_delivery_counts) is false. (Quorum queues
//! count deliveries durably in `x-delivery-count`, but do not enforce exclusive
//! consumers and keep file handles open per queue. An `x-delivery-count` header on a
//! classic queue can only come from a client, so it is kept as an ordinary header and
//! never read as the delivery count.)

//! ## Long handlers and the consumer ack timeout
//!
//! RabbitMQ closes a channel whose delivery stays unacked longer than its
//! `consumer_timeout` (30 minutes by default; set in `rabbitmq.conf`). A member warns
//! (once per delivery) when a delivery has been unsettled for 25 minutes. If the broker
//! does close the channel, the partition's messages go back to the queue and are
//! redelivered, the late ack returns [`Error::SubscriptionClosed`](switchyard_core::Error::SubscriptionClosed), an error naming the
//! timeout is logged, and the member claims the partition again. Keep handlers well
//! under the timeout, or raise it on the broker.

//! ## Ephemeral groups
//!
//! With [`SubscribeOptions::ephemeral`](switchyard_core::SubscribeOptions::ephemeral),
//! the group's partition queues and membership queue are declared with `x-expires` =
//! `ephemeral_expiry` (60 s by default): RabbitMQ deletes each, with any messages in it,
//! once it has had no consumer and no redeclaration for that long, so a group made for
//! one look at a topic does not go on collecting its messages. A member that reconnects
//! within the expiry finds the group as it was; after it, the group starts empty. Every
//! member must declare the group alike: a member with another setting (or another
//! expiry) is refused with a [`DeclareConflict`]. The topic's exchange stays, and so do
//! the hold queues and return exchange of a delayed redelivery made for the group.

//! ## Connection loss
//!
//! Each subscription has its own connection (and so its own locks). When it drops, the
//! member reconnects with a jittered backoff (100 ms doubling to 5 s), redeclares, rejoins and
//! claims partitions again; deliveries from the dead channels cannot be settled
//! ([`Error::SubscriptionClosed`](switchyard_core::Error::SubscriptionClosed)) and the broker redelivers them, so handling is
//! at-least-once across a loss. A publish in flight rides the loss out: what the broker
//! had not confirmed is sent again, with the same ids, on a new connection, until
//! `confirm_timeout_ms` passes without any confirm; only then does it fail, with a
//! transient error naming the cause. A message whose confirm was lost with the
//! connection may so be stored twice: duplicates are the idempotency layer's to skip.
//! lapin's own auto-recovery is not used.
//!
//! ```no_run
//! # async fn demo() -> switchyard_core::Result<()> {
//! use switchyard_core::{Message, SubscribeOptions};
//! let broker = switchyard_rabbitmq::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let mut sub = broker.subscribe(SubscribeOptions::new("orders", "email")).await?;
//! broker.publish("orders", Message::new("order 1").with_key("customer-1")).await?;
//! let delivery = sub.recv().await.unwrap()?;
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
// docs.rs (nightly) marks feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

mod acker;
mod broker;
mod codec;
mod config;
mod connection;
mod error;
mod gate;
mod management;
mod prefetch;
mod publisher;
mod pump;
mod rpc;
mod schedule;
mod subscription;
mod supervisor;
mod tls;
mod topology;

pub use broker::{connect, RabbitBroker};
pub use config::RabbitConfig;
pub use connection::AuthRefused;
pub use error::DeclareConflict;
pub use management::ManagementUnavailable;
pub use publisher::Unroutable;
pub use tls::{TlsProblem, TlsRefused};

/// Header names the RabbitMQ backend reserves.
pub mod headers {
    /// The AMQP header that carries a message's key.
    pub const KEY: &str = "x-switchyard-key";
}

pub(crate) const BACKEND: &str = "rabbitmq";

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::Arc;

    use lapin::BasicProperties;
    use switchyard_core::{Message, Result};

    /// A delivery's properties and body decoded as a message, as the consumer does.
    pub fn decode(props: &BasicProperties, data: Vec<u8>) -> Arc<Message> {
        crate::codec::decode(props, data)
    }

    /// The AMQP properties `message` is published with.
    pub fn properties(message: &Message) -> Result<BasicProperties> {
        crate::codec::properties(message)
    }
}
