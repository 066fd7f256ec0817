//! The broker handle: publishing, subscribing, inspecting and closing, each handed to
//! the module that does it.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use parking_lot::Mutex;
use switchyard_core::{
    AnyBroker, Broker, CancellationToken, Capabilities, Error, GroupInfo, Message, Publisher,
    Receipt, Result, SubscribeOptions, Subscriber, Subscription, TopicInfo,
};

use crate::config::RabbitConfig;
use crate::{connection, error, management, publisher, rpc, subscription, topology, BACKEND};

/// Connects to RabbitMQ from an `amqp://` or `amqps://` URL.
pub async fn connect(url: &str) -> Result<AnyBroker> {
    Ok(Arc::new(RabbitBroker::connect(url).await?))
}

/// A RabbitMQ client: a publishing connection, plus one connection per subscription.
/// Clones share the publisher.
#[derive(Clone)]
pub struct RabbitBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<RabbitConfig>,
    publisher: publisher::PublisherCore,
    subscriptions: Mutex<Vec<Weak<subscription::Shared>>>,
    closed: CancellationToken,
    /// Requests and replies, over direct reply-to (see `rpc`).
    rpc: rpc::Rpc,
}

impl RabbitBroker {
    /// Connects (checking the broker answers) from an `amqp://` URL.
    pub async fn connect(url: &str) -> Result<Self> {
        let config = Arc::new(RabbitConfig::from_url(url)?);
        // Fail now, not at the first publish, when the broker is unreachable.
        let probe = connection::connect_with_retry(&config, "probe").await?;
        crate::connection::close_connection(&probe, "probe").await;
        Ok(Self {
            inner: Arc::new(Inner {
                publisher: publisher::PublisherCore::new(config.clone()),
                rpc: rpc::Rpc::new(config.clone()),
                config,
                subscriptions: Mutex::new(Vec::new()),
                closed: CancellationToken::new(),
            }),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &RabbitConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Publisher for RabbitBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        let mut r = self.inner.publisher.publish(topic, vec![message]).await?;
        Ok(r.pop().expect("one receipt per message"))
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<Vec<Receipt>> {
        self.inner.publisher.publish(topic, messages).await
    }
}

#[async_trait]
impl Subscriber for RabbitBroker {
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        if self.inner.closed.is_cancelled() {
            return Err(Error::Closed { backend: BACKEND });
        }
        let (sub, shared) = subscription::subscribe(
            self.inner.config.clone(),
            options,
            self.inner.closed.child_token(),
        )
        .await?;
        let mut subs = self.inner.subscriptions.lock();
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(&shared));
        Ok(sub)
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            replay: false,
            persistent: true,
            per_key_order: true,
            durable_delivery_counts: false,
            native_dead_letter: self.inner.config.dead_letter_exchange.is_some(),
            delayed_delivery: true,
            max_message_size: Some(self.inner.config.max_message_size),
            request_reply: true,
            at_most_once: true,
            scheduled_publish: true,
        }
    }

    /// Through the topic's cascade of TTL queues, one per power of two of 16 ms (at most
    /// 28 per topic, whatever the delays): the message reaches the groups that exist
    /// when it is due. See the RabbitMQ backend's page (`docs/backends/rabbitmq.md`,
    /// "Scheduled publish").
    async fn publish_at(
        &self,
        topic: &str,
        message: Message,
        when: std::time::SystemTime,
    ) -> Result<Receipt> {
        let delay = when
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        self.inner.publisher.schedule(topic, message, delay).await
    }

    async fn publish_after(
        &self,
        topic: &str,
        message: Message,
        delay: std::time::Duration,
    ) -> Result<Receipt> {
        self.inner.publisher.schedule(topic, message, delay).await
    }

    /// The group's queue depth: ready messages summed over its partition queues (a
    /// group that was never declared has none). Unacked deliveries are not counted, nor
    /// messages waiting in its hold queues for a delayed redelivery.
    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        switchyard_core::backend::validate_name("topic", topic)?;
        switchyard_core::backend::validate_name("group", group)?;
        let names = topology::GroupNames::new(topic, group);
        let queues: Vec<String> = (0..self.inner.config.partitions)
            .map(|p| names.partition(p))
            .collect();
        let mut depths = Depths::open(&self.inner.config).await?;
        let total = depths.ready(&queues).await;
        depths.close().await;
        total
    }

    /// Topic exchanges of the URL's virtual host, each with the groups found among its
    /// partition queues (`T:G.p<i>`) and their lag as [`lag`](Broker::lag) counts it:
    /// ready messages in the group's partition queues. Names come from the management
    /// plugin's HTTP API (`management_url`; AMQP cannot list objects), depths from
    /// AMQP, which is exact where the API's figures are samples. A topic holds no
    /// messages of its own (its groups' queues do), so `messages` is `None`. When the
    /// API does not answer, the error's source is a [`ManagementUnavailable`](crate::ManagementUnavailable) naming the
    /// plugin and how to enable it.
    async fn topics(&self) -> Result<Vec<TopicInfo>> {
        let listing = management::list(&self.inner.config).await?;
        let found = management::topics(&listing);
        let mut depths = Depths::open(&self.inner.config).await?;
        let mut out = Vec::with_capacity(found.len());
        for (topic, groups) in found {
            let mut infos = Vec::with_capacity(groups.len());
            for (group, queues) in groups {
                match depths.ready(&queues).await {
                    Ok(lag) => infos.push(GroupInfo::new(group, Some(lag))),
                    Err(e) => {
                        depths.close().await;
                        return Err(e);
                    }
                }
            }
            out.push(TopicInfo::new(topic, None, infos));
        }
        depths.close().await;
        Ok(out)
    }

    /// Natively, with no plugin: the message waits in the group's hold queue
    /// `T:G.delay.<ms>` (a classic queue with `x-message-ttl = ms`, fed by a fanout
    /// exchange of the same name) and on expiry RabbitMQ dead-letters it, routing key
    /// kept, through the group's return exchange `T:G.return` into the partition queue of
    /// its key — so only this group gets it, in its key's order slot. Declared on first
    /// use and remembered per connection; one hold queue per distinct delay, so use a
    /// few fixed delays (retry tiers), not computed ones. Returns once the broker
    /// confirmed the message into the hold queue.
    ///
    /// RabbitMQ dead-letters from classic queues at most once (without publisher
    /// confirms inside the broker): on a single node only a crash at the instant of
    /// expiry could lose the message, but in a cluster a message whose partition
    /// queue's node is down when it expires is dropped.
    async fn redeliver_after(
        &self,
        topic: &str,
        group: &str,
        message: Message,
        delay: std::time::Duration,
    ) -> Result<()> {
        self.inner
            .publisher
            .redeliver_after(topic, group, message, delay)
            .await
    }

    /// Over RabbitMQ's direct reply-to: the request goes out on this client's own
    /// channel with `reply_to = amq.rabbitmq.reply-to` and the correlation id in
    /// `correlation_id`, transient and expiring with `timeout`; the reply comes back to
    /// that channel only. A lost connection ends the pending requests with a transient
    /// error; the next request opens a new channel.
    async fn request(
        &self,
        topic: &str,
        message: Message,
        timeout: std::time::Duration,
    ) -> Result<Message> {
        self.inner.rpc.request(topic, message, timeout).await
    }

    /// Publishes the reply to the default exchange with routing key `address` (a
    /// direct reply-to address, or any queue the broker named: `amq.*`), transient, and
    /// returns once the broker confirmed it.
    async fn send_reply(&self, address: &str, reply: Message) -> Result<()> {
        self.inner.rpc.send_reply(address, reply).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.rpc.close().await;
        let subs: Vec<_> = self
            .inner
            .subscriptions
            .lock()
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        for s in subs {
            subscription::close_shared(&s);
        }
        self.inner.closed.cancel();
        self.inner.publisher.close().await
    }
}

/// Reads queue depths over one AMQP connection with passive declarations.
struct Depths {
    conn: lapin::Connection,
    channel: Option<lapin::Channel>,
}

impl Depths {
    async fn open(config: &RabbitConfig) -> Result<Self> {
        let conn = connection::connect_once(config, "inspect").await?;
        Ok(Self {
            conn,
            channel: None,
        })
    }

    /// Ready messages summed over `queues`; a missing queue counts as empty.
    async fn ready(&mut self, queues: &[String]) -> Result<u64> {
        use lapin::options::QueueDeclareOptions;
        use lapin::types::FieldTable;
        let mut total = 0u64;
        for queue in queues {
            let channel = match &self.channel {
                Some(c) if c.status().connected() => c.clone(),
                _ => {
                    let c = self
                        .conn
                        .create_channel()
                        .await
                        .map_err(|e| error::map_err("opening a channel", e))?;
                    self.channel = Some(c.clone());
                    c
                }
            };
            let options = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match channel
                .queue_declare(queue.as_str().into(), options, FieldTable::default())
                .await
            {
                Ok(q) => total += u64::from(q.message_count()),
                // A passive declaration of a missing queue closes its channel; the next
                // one opens another.
                Err(e) if error::soft_code(&e) == Some(404) => self.channel = None,
                Err(e) => return Err(error::map_err("reading a queue's depth", e)),
            }
        }
        Ok(total)
    }

    async fn close(self) {
        crate::connection::close_connection(&self.conn, "inspect").await;
    }
}
