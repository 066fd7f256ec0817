//! The backend traits: publishing, subscribing, and a broker that does both.
//!
//! They are object-safe, so an application can hold an [`AnyBroker`] chosen at run time
//! from a URL. Each trait has few required methods; the rest have default bodies.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;

use crate::delivery::Delivery;
use crate::error::Result;
use crate::guarantee::Guarantee;
use crate::message::{Message, Receipt};
use crate::names::{validate_name, MAX_NAME_LEN};

/// Sends messages to topics.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one message; resolves once the broker has accepted it (durably, where
    /// the backend is durable).
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt>;

    /// Publishes several messages to one topic, in order. Backends override it to batch.
    /// On error, some of the messages may have been published.
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<Vec<Receipt>> {
        let mut receipts = Vec::with_capacity(messages.len());
        for message in messages {
            receipts.push(self.publish(topic, message).await?);
        }
        Ok(receipts)
    }
}

/// Typed publishing helpers for every [`Publisher`].
#[async_trait]
pub trait PublisherExt: Publisher {
    /// Publishes `value` as JSON, with an optional ordering key.
    async fn publish_json<T: Serialize + Sync + ?Sized>(
        &self,
        topic: &str,
        key: Option<&str>,
        value: &T,
    ) -> Result<Receipt> {
        let mut message = Message::json(value)?;
        message.key = key.map(str::to_string);
        self.publish(topic, message).await
    }

    /// Publishes raw bytes.
    async fn publish_bytes(&self, topic: &str, payload: bytes::Bytes) -> Result<Receipt> {
        self.publish(topic, Message::new(payload)).await
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}

/// Where a group with no stored position starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartFrom {
    /// The oldest message the broker still retains (Kafka's `auto.offset.reset=earliest`).
    #[default]
    Earliest,
    /// Only messages published after the group first subscribed.
    Latest,
}

/// What to subscribe to: a topic and a group.
///
/// - publish-subscribe: give each service its own group; every group gets every message;
/// - competing consumers: subscribe several times with the same group; they share the work;
/// - point-to-point: [`SubscribeOptions::queue`], a topic consumed by one group.
///
/// ```
/// use switchyard_core::{SubscribeOptions, StartFrom};
/// let payment = SubscribeOptions::new("orders", "payment").start(StartFrom::Latest);
/// let tasks = SubscribeOptions::queue("tasks");
/// assert_eq!((tasks.topic.as_str(), tasks.group.as_str()), ("tasks", "tasks"));
/// # let _ = payment;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "settings take effect only when passed on"]
pub struct SubscribeOptions {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
    /// Where a new group starts.
    pub start: StartFrom,
    /// How many unsettled deliveries this subscriber may hold at once (its in-flight window).
    pub prefetch: usize,
    /// Whether the group's broker state goes away after its last member leaves, instead
    /// of staying to collect every later message for a member that may never come back
    /// (a group made for one look at a topic, as `switchyard consume` does). Messages
    /// the group has not finished when it goes away are gone for it. Per backend:
    ///
    /// - **memory**: the group (read position, held-back messages) is dropped when its
    ///   last member closes or is dropped; a later subscribe starts a new group at
    ///   [`start`](Self::start()).
    /// - **RabbitMQ**: the group's queues (`T:G.p<i>`, `T:G.members`) are declared with
    ///   `x-expires` = [`ephemeral_expiry`](Self::ephemeral_expiry()): the broker deletes
    ///   each one, with the messages in it, once it has had no consumer for that long. A
    ///   member that reconnects within it keeps the group. The topic's exchange stays
    ///   (it is the topic's, not the group's), and so do hold queues a delayed
    ///   redelivery made for the group.
    /// - **Kafka**: nothing to remove client-side: a group holds no copies of messages,
    ///   only committed offsets, which the broker itself drops once the group has been
    ///   empty for `offsets.retention.minutes` (7 days by default). Offsets are still
    ///   committed, so members that join and leave hand over without re-reading.
    ///
    /// Every member of a group must agree: RabbitMQ refuses a member whose setting
    /// differs from the existing queues' (a `DeclareConflict`), memory refuses one whose
    /// setting differs from the live group's.
    pub ephemeral: bool,
    /// How long an ephemeral group's broker state outlives its last member where the
    /// broker expires it on a timer (RabbitMQ's `x-expires`; at least 1 ms). Default
    /// [`DEFAULT_EPHEMERAL_EXPIRY`](Self::DEFAULT_EPHEMERAL_EXPIRY). Ignored unless
    /// [`ephemeral`](Self::ephemeral()) is set.
    pub ephemeral_expiry: Duration,
    /// Whether the consumer acks before or after its handler runs (default
    /// [`Guarantee::AtLeastOnce`]). The runtime acts on it; a backend may use it to
    /// keep its promise (Kafka commits each ack at once under at-most-once).
    pub guarantee: Guarantee,
}

impl SubscribeOptions {
    /// Default in-flight window of a subscription.
    pub const DEFAULT_PREFETCH: usize = 256;

    /// Default [`ephemeral_expiry`](Self::ephemeral_expiry()): long enough for a member
    /// to ride out a reconnection, short enough that a finished look leaves nothing.
    pub const DEFAULT_EPHEMERAL_EXPIRY: Duration = Duration::from_secs(60);

    /// Subscribe `group` to `topic`.
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            group: group.into(),
            start: StartFrom::Earliest,
            prefetch: Self::DEFAULT_PREFETCH,
            ephemeral: false,
            ephemeral_expiry: Self::DEFAULT_EPHEMERAL_EXPIRY,
            guarantee: Guarantee::AtLeastOnce,
        }
    }

    /// A point-to-point queue: the topic `name` consumed by the group `name`.
    pub fn queue(name: impl Into<String>) -> Self {
        let name = name.into();
        Self::new(name.clone(), name)
    }

    /// Where a new group starts.
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// The in-flight window.
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Whether the group's broker state goes away after its last member leaves; the
    /// `ephemeral` field says what that means on each backend.
    pub fn ephemeral(mut self, ephemeral: bool) -> Self {
        self.ephemeral = ephemeral;
        self
    }

    /// How long an ephemeral group outlives its last member where the broker expires it
    /// on a timer (RabbitMQ's `x-expires`; the `ephemeral_expiry` field).
    pub fn ephemeral_expiry(mut self, expiry: Duration) -> Self {
        self.ephemeral_expiry = expiry;
        self
    }

    /// Whether the consumer acks before or after its handler runs (the `guarantee` field).
    pub fn guarantee(mut self, guarantee: Guarantee) -> Self {
        self.guarantee = guarantee;
        self
    }

    /// Checks names and numbers; backends call it before subscribing. A consumed topic
    /// leaves room for its dead-letter topic, `<topic>.dlq`, within the name limit.
    pub fn validate(&self) -> Result<()> {
        validate_name("topic", &self.topic)?;
        validate_name("group", &self.group)?;
        // A consumer's failures go to `<topic>.dlq`: a name that cannot exist would make
        // a poison message loop instead of being dead-lettered, so say so at the start.
        let dlq = format!("{}.dlq", self.topic);
        if dlq.len() > MAX_NAME_LEN {
            return Err(crate::Error::InvalidName {
                what: "topic",
                name: self.topic.clone(),
                reason: format!(
                    "its dead-letter topic {dlq:?} would be {} bytes, over the {MAX_NAME_LEN}-byte limit on names; a topic that is consumed may have at most {} bytes",
                    dlq.len(),
                    MAX_NAME_LEN - ".dlq".len()
                ),
            });
        }
        if self.prefetch == 0 {
            return Err(crate::Error::config(
                "prefetch",
                "must be at least 1: it is how many messages a subscriber may hold unacked",
            ));
        }
        if self.ephemeral && self.ephemeral_expiry < Duration::from_millis(1) {
            return Err(crate::Error::config(
                "ephemeral_expiry",
                "must be at least 1 ms: it is how long an ephemeral group outlives its last member",
            ));
        }
        Ok(())
    }
}

/// A stream of deliveries for one member of a group.
///
/// Contract every backend keeps (the conformance suite checks it):
/// - a message with a key is not handed out while an earlier message with the same key
///   is unsettled in the same group, so same-key messages are handled in publish order
///   even by a concurrent consumer;
/// - at most `prefetch` deliveries are unsettled at once;
/// - deliveries still unsettled when the subscription closes are redelivered later.
#[async_trait]
pub trait Subscription: Send {
    /// Up to `max` deliveries appended to `buf`, waiting for at least one. Returns how
    /// many were added; 0 means the subscription is closed. The one method a backend
    /// must write: taking many messages per call is what keeps the runtime fast. It must
    /// be cancel-safe (dropping the future before it completes loses no message), since
    /// the runtime polls it in a `select!`.
    async fn recv_many(&mut self, buf: &mut Vec<Delivery>, max: usize) -> Result<usize>;

    /// The next delivery; `None` once the subscription is closed.
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        let mut buf = Vec::with_capacity(1);
        match self.recv_many(&mut buf, 1).await {
            Ok(0) => None,
            Ok(_) => buf.pop().map(Ok),
            Err(e) => Some(Err(e)),
        }
    }

    /// Leaves the group cleanly: unsettled deliveries go back for redelivery.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// Opens subscriptions.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Joins `options.group` on `options.topic` as one more member.
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>>;
}

/// What a backend can do, so tests and applications can adapt instead of guessing.
/// Backends build it with `..Default::default()` so new fields stay compatible.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// A new group can start at the earliest retained message (Kafka, memory), not only
    /// at messages published after it joined (RabbitMQ queues).
    pub replay: bool,
    /// Messages survive a broker restart.
    pub persistent: bool,
    /// Same-key messages are handled in publish order within a group.
    pub per_key_order: bool,
    /// Delivery counts survive a consumer restart (not just in-process redelivery).
    pub durable_delivery_counts: bool,
    /// The broker can dead-letter messages itself: [`Nack::Reject`](crate::Nack::Reject)
    /// hands the message to a broker-side dead-letter destination (RabbitMQ with
    /// `dead_letter_exchange=`). Without it, a rejected message is dropped.
    pub native_dead_letter: bool,
    /// The broker can delay a delivery.
    pub delayed_delivery: bool,
    /// The largest payload the backend accepts, where it has a limit.
    pub max_message_size: Option<usize>,
    /// [`Broker::request`] works: requests get replies through the broker.
    pub request_reply: bool,
    /// [`Guarantee::AtMostOnce`] holds across a consumer process dying: a delivery acked
    /// on receipt is never handed out again (Kafka commits it before the handler runs).
    pub at_most_once: bool,
    /// [`Broker::publish_at`] and [`Broker::publish_after`] work: a message published
    /// for later reaches every group of its topic once due, never before.
    pub scheduled_publish: bool,
}

/// A topic (or queue) as the broker reports it, for tooling.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicInfo {
    /// The topic's name.
    pub name: String,
    /// Messages it holds, or its end offset (summed over partitions), where known.
    pub messages: Option<u64>,
    /// Its groups and how far behind each is, where known.
    pub groups: Vec<GroupInfo>,
}

/// A group of a topic, for tooling.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// Messages published but not yet read or acked by the group, where known
    /// (Kafka: end offsets minus committed; RabbitMQ: queue depth).
    pub lag: Option<u64>,
}

impl TopicInfo {
    /// A topic's description; backends build these.
    pub fn new(name: impl Into<String>, messages: Option<u64>, groups: Vec<GroupInfo>) -> Self {
        Self {
            name: name.into(),
            messages,
            groups,
        }
    }
}

impl GroupInfo {
    /// A group's description; backends build these.
    pub fn new(name: impl Into<String>, lag: Option<u64>) -> Self {
        Self {
            name: name.into(),
            lag,
        }
    }
}

/// A client that publishes and subscribes. `Arc<dyn Broker>` is [`AnyBroker`].
#[async_trait]
pub trait Broker: Publisher + Subscriber {
    /// The backend's name: "memory", "kafka" or "rabbitmq".
    fn backend(&self) -> &'static str;
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// Flushes and closes the client. Default: nothing to do.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
    /// The topics it holds with sizes and group lag, where the backend can tell.
    /// Default: [`Error::Unsupported`](crate::Error::Unsupported).
    async fn topics(&self) -> Result<Vec<TopicInfo>> {
        Err(crate::Error::Unsupported {
            backend: self.backend(),
            what: "listing topics".into(),
        })
    }
    /// How far `group` is behind on `topic`: messages published but not yet done by the
    /// group (Kafka: end offsets minus committed offsets; RabbitMQ: queue depth).
    /// Default: [`Error::Unsupported`](crate::Error::Unsupported).
    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        let _ = (topic, group);
        Err(crate::Error::Unsupported {
            backend: self.backend(),
            what: "reporting group lag".into(),
        })
    }
    /// Puts `message` back on `topic` for `group` only, no sooner than `delay` from now,
    /// with the broker's own delay mechanism (RabbitMQ: a queue with a message TTL that
    /// dead-letters into the group's queues). Returns once the broker holds the message
    /// safely, so the caller may then ack the original.
    ///
    /// Backends without one (`Capabilities::delayed_delivery` false) return
    /// [`Error::Unsupported`](crate::Error::Unsupported); retry tiers then fall back to
    /// tier topics.
    async fn redeliver_after(
        &self,
        topic: &str,
        group: &str,
        message: Message,
        delay: Duration,
    ) -> Result<()> {
        let _ = (topic, group, message, delay);
        Err(crate::Error::Unsupported {
            backend: self.backend(),
            what: "delayed redelivery".into(),
        })
    }
    /// Publishes `message` to `topic` as a request and waits up to `timeout` for its
    /// reply, which a [`reply_fn`](crate::reply_fn) handler consuming `topic` sends. The
    /// reply comes to this client only, matched by a correlation id (see
    /// [`rpc`](crate::rpc)).
    ///
    /// Errors: [`Error::Timeout`](crate::Error::Timeout) when no reply came in time (no
    /// responder, or it panicked or died), [`Error::ErrorReply`](crate::Error::ErrorReply)
    /// when the responder returned an error, [`Error::Closed`](crate::Error::Closed) when
    /// the client was closed first. Default (`Capabilities::request_reply` false):
    /// [`Error::Unsupported`](crate::Error::Unsupported).
    async fn request(&self, topic: &str, message: Message, timeout: Duration) -> Result<Message> {
        let _ = (topic, message, timeout);
        Err(crate::Error::Unsupported {
            backend: self.backend(),
            what: "request/reply".into(),
        })
    }
    /// Sends a responder's `reply` to the reply `address` a request carried. Default: a
    /// publish to the reply topic `address`
    /// ([`backend::rpc::pubsub`](crate::backend::rpc::pubsub)), which refuses addresses
    /// that are not reply topics; backends with their own reply channel override it.
    async fn send_reply(&self, address: &str, reply: Message) -> Result<()> {
        crate::backend::rpc::pubsub::send_reply(self, address, reply).await
    }
    /// Publishes `message` to `topic` for every group of the topic, no sooner than
    /// `when` (a time already past publishes at once). Resolves once the backend holds
    /// the message (durably where it is durable); the receipt has its id, and no
    /// partition or offset, as it is not on the topic yet. What a publish would refuse
    /// (names, reserved headers, size) is refused here. Each backend's way of waiting,
    /// and how late a message can be, is in the scheduling guide (`docs/scheduling.md`).
    ///
    /// Default (`Capabilities::scheduled_publish` false):
    /// [`Error::Unsupported`](crate::Error::Unsupported).
    async fn publish_at(&self, topic: &str, message: Message, when: SystemTime) -> Result<Receipt> {
        let _ = (topic, message, when);
        Err(crate::Error::Unsupported {
            backend: self.backend(),
            what: "scheduled publish".into(),
        })
    }
    /// Publishes `message` to `topic` for every group of the topic, no sooner than
    /// `delay` from now: [`publish_at`](Self::publish_at) with the time `delay` from now,
    /// unless the backend overrides it.
    async fn publish_after(
        &self,
        topic: &str,
        message: Message,
        delay: Duration,
    ) -> Result<Receipt> {
        let when = SystemTime::now().checked_add(delay).ok_or_else(|| {
            crate::Error::config(
                "delay",
                format!("{delay:?} from now is past what the clock holds"),
            )
        })?;
        self.publish_at(topic, message, when).await
    }
}

/// A broker chosen at run time.
pub type AnyBroker = Arc<dyn Broker>;
