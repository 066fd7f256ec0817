//! The broker handle: the producer, topic creation, and subscriptions.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::future::try_join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use switchyard_core::{
    check_headers, validate_name, Broker, Capabilities, Error, Message, Publisher, Receipt, Result,
    SubscribeOptions, Subscriber, Subscription, TopicInfo,
};

use crate::config::{DeliveryGuarantee, KafkaConfig};
use crate::consumer::KafkaSubscription;
use crate::record;

pub(crate) const BACKEND: &str = "kafka";

/// Where [`KafkaBroker::replay`] moves a group's position.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayFrom {
    /// The oldest retained record of every partition.
    Earliest,
    /// The same offset in every partition.
    Offset(i64),
    /// Explicit `(partition, offset)` pairs; other partitions keep their position.
    Offsets(Vec<(i32, i64)>),
    /// The first record stamped at or after this time, in every partition (the end of
    /// the partition where there is none).
    Timestamp(SystemTime),
}

/// A Kafka client: one idempotent producer shared by every publish, an admin client
/// for topic creation, and one librdkafka consumer per subscription. Clones share them.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist, so creation costs one round trip per topic.
    topics: Mutex<HashSet<String>>,
    closed: AtomicBool,
}

/// A Kafka error with what we were doing and where, so the message names the broker.
#[derive(Debug)]
struct Context {
    what: String,
    source: KafkaError,
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Maps a librdkafka error onto switchyard's, keeping whether a retry may help.
pub(crate) fn kafka_error(what: impl Into<String>, source: KafkaError) -> Error {
    let transient = match source.rdkafka_error_code() {
        Some(code) => !matches!(
            code,
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::InvalidConfig
                | RDKafkaErrorCode::InvalidArgument
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::UnsupportedVersion
        ),
        None => !matches!(source, KafkaError::ClientConfig(..)),
    };
    let err = Context {
        what: what.into(),
        source,
    };
    if transient {
        Error::transient(BACKEND, err)
    } else {
        Error::permanent(BACKEND, err)
    }
}

impl KafkaBroker {
    /// Connects with these settings. Clients connect lazily: an unreachable broker shows
    /// up as a publish or subscribe that times out, naming the address.
    pub fn new(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let producer: FutureProducer = config
            .producer()
            .create()
            .map_err(|e| config_error("producer", e))?;
        let mut admin_config = config.base();
        config.apply_client(&mut admin_config);
        let admin: AdminClient<DefaultClientContext> = admin_config
            .create()
            .map_err(|e| config_error("admin client", e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                topics: Mutex::new(HashSet::new()),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Connects from a `kafka://host:port[,host:port][?settings]` URL.
    pub fn connect(url: &str) -> Result<Self> {
        Self::new(KafkaConfig::from_url(url)?)
    }

    /// The settings in force.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The underlying rdkafka producer, for what switchyard does not wrap.
    pub fn producer(&self) -> &FutureProducer {
        &self.inner.producer
    }

    fn servers(&self) -> &str {
        &self.inner.config.bootstrap_servers
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { backend: BACKEND });
        }
        Ok(())
    }

    /// Makes sure `topic` exists: creates it (partitions and replication from the
    /// config) unless creation is off, in which case a missing topic is an error.
    pub async fn ensure_topic(&self, topic: &str) -> Result<()> {
        validate_name("topic", topic)?;
        if lock(&self.inner.topics).contains(topic) {
            return Ok(());
        }
        let timeout = self.inner.config.publish_timeout;
        if self.inner.config.create_topics {
            let new = NewTopic::new(
                topic,
                self.inner.config.partitions,
                TopicReplication::Fixed(self.inner.config.replication),
            );
            let opts = AdminOptions::new()
                .request_timeout(Some(timeout))
                .operation_timeout(Some(timeout));
            let results =
                tokio::time::timeout(timeout, self.inner.admin.create_topics([&new], &opts))
                    .await
                    .map_err(|_| {
                        self.unreachable(timeout, format!("topic {topic:?} to be created"))
                    })?
                    .map_err(|e| {
                        kafka_error(format!("creating topic {topic:?} on {}", self.servers()), e)
                    })?;
            for r in results {
                match r {
                    Ok(_) => tracing::info!(
                        topic,
                        partitions = self.inner.config.partitions,
                        "created Kafka topic"
                    ),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        return Err(kafka_error(
                            format!("creating topic {topic:?} on {}", self.servers()),
                            KafkaError::AdminOp(code),
                        ))
                    }
                }
            }
        } else {
            let producer = self.inner.producer.clone();
            let name = topic.to_string();
            // fetch_metadata blocks on a network round trip.
            let metadata = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(None, timeout)
            })
            .await
            .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
            .map_err(|e| kafka_error(format!("reading topics from {}", self.servers()), e))?;
            let exists = metadata
                .topics()
                .iter()
                .any(|t| t.name() == name && !t.partitions().is_empty());
            if !exists {
                return Err(Error::Config {
                    setting: "create_topics".into(),
                    message: format!(
                        "topic {topic:?} does not exist on {} and create_topics=false; create it, or allow creation",
                        self.servers()
                    ),
                });
            }
        }
        lock(&self.inner.topics).insert(topic.to_string());
        Ok(())
    }

    /// Moves `group`'s committed position on `topic`, so its next members re-read from
    /// there (replay after a bug fix, or skip ahead). Stop the group's members first: a
    /// running member would overwrite the position with its next commit (Apache Kafka
    /// refuses to reset an active group for the same reason).
    pub async fn replay(&self, topic: &str, group: &str, from: ReplayFrom) -> Result<()> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.ensure_topic(topic).await?;
        let consumer: BaseConsumer = self
            .inner
            .config
            .consumer(group, true)
            .create()
            .map_err(|e| config_error("consumer", e))?;
        let timeout = self.inner.config.publish_timeout;
        let topic = topic.to_string();
        let servers = self.servers().to_string();
        // Metadata, offset look-ups and the commit are blocking round trips.
        tokio::task::spawn_blocking(move || -> Result<()> {
            let wrap = |what: &str, e| kafka_error(format!("{what} for {topic:?} on {servers}"), e);
            let metadata = consumer
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| wrap("reading partitions", e))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic)
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            let mut tpl = TopicPartitionList::new();
            match from {
                ReplayFrom::Earliest => {
                    for p in partitions {
                        let (low, _) = consumer
                            .fetch_watermarks(&topic, p, timeout)
                            .map_err(|e| wrap("reading the oldest offset", e))?;
                        let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(low));
                    }
                }
                ReplayFrom::Offset(o) => {
                    for p in partitions {
                        let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(o));
                    }
                }
                ReplayFrom::Offsets(list) => {
                    for (p, o) in list {
                        let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(o));
                    }
                }
                ReplayFrom::Timestamp(t) => {
                    let mut query = TopicPartitionList::new();
                    for p in &partitions {
                        let _ = query.add_partition_offset(
                            &topic,
                            *p,
                            Offset::Offset(crate::record::millis(t)),
                        );
                    }
                    let found = consumer
                        .offsets_for_times(query, timeout)
                        .map_err(|e| wrap("looking up offsets by time", e))?;
                    for e in found.elements() {
                        let offset = match e.offset() {
                            Offset::Offset(o) => o,
                            _ => {
                                consumer
                                    .fetch_watermarks(&topic, e.partition(), timeout)
                                    .map_err(|e| wrap("reading the end offset", e))?
                                    .1
                            }
                        };
                        let _ =
                            tpl.add_partition_offset(&topic, e.partition(), Offset::Offset(offset));
                    }
                }
            }
            if tpl.count() == 0 {
                return Ok(());
            }
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| wrap("committing the replay position", e))
        })
        .await
        .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
    }

    /// Partitions of `topic` with their low and high watermarks, and `group`'s committed
    /// offsets when a group is given. Blocking round trips, run off the async threads.
    async fn offsets(
        &self,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<PartitionOffsets>> {
        // A group id is needed to read committed offsets; without one, any will do.
        let consumer: BaseConsumer = self
            .inner
            .config
            .consumer(group.unwrap_or("switchyard-inspect"), true)
            .create()
            .map_err(|e| config_error("consumer", e))?;
        let timeout = self.inner.config.publish_timeout;
        let topic = topic.map(str::to_string);
        let with_group = group.is_some();
        let servers = self.servers().to_string();
        tokio::task::spawn_blocking(move || -> Result<Vec<PartitionOffsets>> {
            let wrap = |what: &str, e| kafka_error(format!("{what} on {servers}"), e);
            let metadata = consumer
                .fetch_metadata(topic.as_deref(), timeout)
                .map_err(|e| wrap("reading topic metadata", e))?;
            let mut out = Vec::new();
            let mut tpl = TopicPartitionList::new();
            for t in metadata.topics() {
                if t.name().starts_with("__") || t.partitions().is_empty() {
                    continue;
                }
                for p in t.partitions() {
                    let (low, high) = consumer
                        .fetch_watermarks(t.name(), p.id(), timeout)
                        .map_err(|e| wrap("reading watermarks", e))?;
                    out.push(PartitionOffsets {
                        topic: t.name().to_string(),
                        low,
                        high,
                        committed: None,
                    });
                    tpl.add_partition(t.name(), p.id());
                }
            }
            if with_group && tpl.count() > 0 {
                let committed = consumer
                    .committed_offsets(tpl, timeout)
                    .map_err(|e| wrap("reading committed offsets", e))?;
                for (slot, e) in out.iter_mut().zip(committed.elements()) {
                    if let Offset::Offset(o) = e.offset() {
                        slot.committed = Some(o);
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
    }

    fn unreachable(&self, after: Duration, what: String) -> Error {
        Error::Timeout {
            after,
            what: format!(
                "{what} by the Kafka broker(s) at {} (is it reachable?)",
                self.servers()
            ),
        }
    }

    fn check_size(&self, message: &Message) -> Result<()> {
        let limit = self.inner.config.max_message_size;
        // The payload is what the caller controls; a record whose key and headers push
        // it over the limit is refused by librdkafka and mapped to the same error.
        if message.payload.len() > limit {
            return Err(self.too_large(message));
        }
        Ok(())
    }

    fn too_large(&self, message: &Message) -> Error {
        Error::MessageTooLarge {
            id: message.id.clone(),
            size: message.payload.len(),
            limit: self.inner.config.max_message_size,
            backend: BACKEND,
        }
    }

    /// Hands one record to librdkafka, waiting while its queue is full.
    async fn enqueue(&self, topic: &str, message: &Message) -> Result<DeliveryFuture> {
        let headers = record::headers(message);
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
            .payload(&message.payload[..])
            .headers(headers)
            .timestamp(record::millis(message.timestamp));
        if let Some(key) = &message.key {
            rec = rec.key(key.as_str());
        }
        loop {
            match self.inner.producer.send_result(rec) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // librdkafka's queue drains as the broker acknowledges; wait briefly.
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(self.produce_error(message, e)),
            }
        }
    }

    fn produce_error(&self, message: &Message, e: KafkaError) -> Error {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => self.too_large(message),
            Some(RDKafkaErrorCode::MessageTimedOut) => self.unreachable(
                self.inner.config.publish_timeout,
                format!("message {} to be acknowledged", message.id),
            ),
            _ => kafka_error(
                format!("publishing message {} to {}", message.id, self.servers()),
                e,
            ),
        }
    }

    async fn settle(&self, message: &Message, future: DeliveryFuture) -> Result<Receipt> {
        match future.await {
            Err(_) => Err(Error::Closed { backend: BACKEND }),
            Ok(Err((e, _))) => Err(self.produce_error(message, e)),
            Ok(Ok(d)) => {
                // With acks=0 the broker never answers, so there is no offset to report.
                let offset = match self.inner.config.delivery {
                    DeliveryGuarantee::AtMostOnce => None,
                    DeliveryGuarantee::AtLeastOnce => Some(d.offset).filter(|o| *o >= 0),
                };
                Ok(Receipt::new(message.id.clone(), Some(d.partition), offset))
            }
        }
    }

    async fn publish_inner(&self, topic: &str, messages: &[Message]) -> Result<Vec<Receipt>> {
        self.check_open()?;
        validate_name("topic", topic)?;
        messages.iter().try_for_each(check_headers)?;
        messages.iter().try_for_each(record::check_header_names)?;
        self.ensure_topic(topic).await?;
        // Enqueue everything first, then await the acknowledgements: librdkafka batches
        // the records into few produce requests, and the idempotent producer keeps them
        // in order per partition. An oversize message is refused on its own: the others
        // are still published (a too-large record must not fail the broker-side batch it
        // would have travelled in), and the error names it.
        let mut refused = None;
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let queued = match self.check_size(m) {
                Ok(()) => self.enqueue(topic, m).await,
                Err(e) => Err(e),
            };
            match queued {
                Ok(f) => pending.push((m, f)),
                Err(e @ Error::MessageTooLarge { .. }) => {
                    refused.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let receipts = try_join_all(pending.into_iter().map(|(m, f)| self.settle(m, f))).await?;
        match refused {
            Some(e) => Err(e),
            None => Ok(receipts),
        }
    }
}

fn config_error(what: &str, e: KafkaError) -> Error {
    Error::config(
        "url",
        format!(
            "librdkafka rejected the {what} settings: {}",
            crate::config::describe_client_error(&e)
        ),
    )
}

/// One partition's offsets, for `topics()` and `lag()`.
struct PartitionOffsets {
    topic: String,
    low: i64,
    high: i64,
    committed: Option<i64>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // State behind these locks stays consistent between statements; keep going after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Publisher for KafkaBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        let mut r = self
            .publish_inner(topic, std::slice::from_ref(&message))
            .await?;
        Ok(r.pop().expect("one receipt per message"))
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<Vec<Receipt>> {
        self.publish_inner(topic, &messages).await
    }
}

#[async_trait]
impl Subscriber for KafkaBroker {
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        self.check_open()?;
        options.validate()?;
        // Subscribing to a missing topic would join with no partitions and miss the
        // first messages; make it exist first.
        self.ensure_topic(&options.topic).await?;
        let sub = KafkaSubscription::start(&self.inner.config, options).await?;
        Ok(Box::new(sub))
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            replay: true,
            persistent: true,
            per_key_order: true,
            durable_attempts: false,
            native_dead_letter: false,
            delayed_delivery: false,
            max_message_size: Some(self.inner.config.max_message_size),
        }
    }

    async fn topics(&self) -> Result<Vec<TopicInfo>> {
        // Groups are not listed: tansu drops the connection on ListGroups/DescribeGroups;
        // ask for a group's lag with `lag()` (or `switchyard topics --group`).
        let mut topics: Vec<TopicInfo> = Vec::new();
        for p in self.offsets(None, None).await? {
            let messages = u64::try_from(p.high - p.low).unwrap_or(0);
            match topics.iter_mut().find(|t| t.name == p.topic) {
                Some(t) => t.messages = Some(t.messages.unwrap_or(0) + messages),
                None => topics.push(TopicInfo::new(p.topic, Some(messages), Vec::new())),
            }
        }
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(topics)
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let parts = self.offsets(Some(topic), Some(group)).await?;
        // With nothing committed, a group has everything retained still to read.
        Ok(parts
            .iter()
            .filter(|p| p.topic == topic)
            .map(|p| u64::try_from(p.high - p.committed.unwrap_or(p.low).max(p.low)).unwrap_or(0))
            .sum())
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        let producer = self.inner.producer.clone();
        let timeout = self.inner.config.publish_timeout;
        // flush blocks until every queued record is acknowledged (or the timeout).
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
            .map_err(|e| kafka_error("flushing the producer", e))
    }
}
