//! The broker handle: the producer, topic creation, and subscriptions.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use switchyard_core::backend::validate_name;
use switchyard_core::{
    Broker, Capabilities, Error, Message, Result, SubscribeOptions, Subscriber, Subscription,
    TopicInfo,
};

use crate::config::KafkaConfig;
use crate::context::{BrokerErrors, KafkaContext};
use crate::subscription::KafkaSubscription;

/// The backend's name in errors and `Broker::backend`.
pub(crate) const BACKEND: &str = "kafka";

/// A Kafka client: one idempotent producer shared by every publish, an admin client
/// for topic creation, and one librdkafka consumer per subscription. Clones share them.
#[derive(Clone)]
pub struct KafkaBroker {
    pub(crate) inner: Arc<Inner>,
}

/// What clones of a [`KafkaBroker`] share.
pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: FutureProducer<KafkaContext>,
    pub(crate) admin: AdminClient<KafkaContext>,
    /// The last broker-connection error of the producer or the admin client.
    pub(crate) errors: BrokerErrors,
    /// Topics known to exist, so creation costs one round trip per topic.
    pub(crate) topics: Mutex<HashSet<String>>,
    pub(crate) closed: AtomicBool,
    /// Request/reply: pending requests, reply topics made, the reply producer.
    pub(crate) replies: crate::rpc::Replies,
    /// The schedulers of the topics this client scheduled on.
    pub(crate) schedulers: crate::schedule::Schedulers,
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
        let producer_config = config.producer();
        let errors = BrokerErrors::new(&producer_config);
        let context = || KafkaContext {
            errors: errors.clone(),
        };
        let producer: FutureProducer<KafkaContext> = producer_config
            .create_with_context(context())
            .map_err(|e| config_error("producer", e))?;
        let mut admin_config = config.base();
        config.apply_client(&mut admin_config);
        let admin: AdminClient<KafkaContext> = admin_config
            .create_with_context(context())
            .map_err(|e| config_error("admin client", e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                errors,
                topics: Mutex::new(HashSet::new()),
                closed: AtomicBool::new(false),
                replies: crate::rpc::Replies::new(),
                schedulers: Default::default(),
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
    pub fn producer(&self) -> &FutureProducer<KafkaContext> {
        &self.inner.producer
    }

    /// The bootstrap servers, to name the broker in errors.
    pub(crate) fn servers(&self) -> &str {
        &self.inner.config.bootstrap_servers
    }

    /// `Error::Closed` once `close` was called.
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { backend: BACKEND });
        }
        Ok(())
    }

    /// Makes sure `topic` exists: creates it (partitions and replication from the
    /// config) unless creation is off, in which case a missing topic is an error.
    pub async fn ensure_topic(&self, topic: &str) -> Result<()> {
        validate_name("topic", topic)?;
        if self.inner.topics.lock().contains(topic) {
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
                    .map_err(|e| match timed_out(&e) {
                        true => self.unreachable(timeout, format!("topic {topic:?} to be created")),
                        false => kafka_error(
                            format!("creating topic {topic:?} on {}", self.servers()),
                            e,
                        ),
                    })?;
            for r in results {
                match r {
                    Ok(_) => tracing::info!(
                        topic,
                        partitions = self.inner.config.partitions,
                        "created Kafka topic"
                    ),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) if timed_out(&KafkaError::AdminOp(code)) => {
                        return Err(
                            self.unreachable(timeout, format!("topic {topic:?} to be created"))
                        );
                    }
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
            .map_err(|e| match timed_out(&e) {
                true => self.unreachable(timeout, "the topic list to be sent".into()),
                false => kafka_error(format!("reading topics from {}", self.servers()), e),
            })?;
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
        self.inner.topics.lock().insert(topic.to_string());
        Ok(())
    }

    /// The error of a wait for the broker that timed out: a permanent
    /// [`KafkaRefused`](crate::KafkaRefused) if the broker kept refusing the TLS
    /// handshake or the SASL login, else a timeout naming its address and the last
    /// connection error.
    pub(crate) fn unreachable(&self, after: Duration, what: String) -> Error {
        self.inner.errors.timed_out(
            after,
            format!("{what} by the Kafka broker(s) at {}", self.servers()),
        )
    }
}

/// Whether librdkafka gave up waiting for the broker (which may be refusing us).
fn timed_out(e: &KafkaError) -> bool {
    // An admin operation's error carries its code outside `rdkafka_error_code`.
    let code = match e {
        KafkaError::AdminOp(code) => Some(*code),
        e => e.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut)
    )
}

/// librdkafka refused a client's settings: a configuration error (secrets redacted).
pub(crate) fn config_error(what: &str, e: KafkaError) -> Error {
    Error::config(
        "url",
        format!(
            "librdkafka rejected the {what} settings: {}",
            crate::client::describe_client_error(&e)
        ),
    )
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
            durable_delivery_counts: false,
            native_dead_letter: false,
            delayed_delivery: false,
            max_message_size: Some(self.inner.config.max_message_size),
            request_reply: true,
            at_most_once: true,
            scheduled_publish: true,
        }
    }

    /// Through the delay topic `<topic>.scheduled` and this client's scheduler (the
    /// group `<topic>.scheduler`), which republishes the message when due; see the
    /// Kafka backend's page (`docs/backends/kafka.md`, "Scheduled publish") for who runs
    /// it and where a duplicate can occur.
    async fn publish_at(
        &self,
        topic: &str,
        message: switchyard_core::Message,
        when: std::time::SystemTime,
    ) -> Result<switchyard_core::Receipt> {
        self.schedule(topic, message, when).await
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
        // Pending requests end with a closed error; the reply reader stops below.
        self.inner.replies.requester.close();
        // Before the flush: each scheduler commits what it republished as it stops.
        self.inner.schedulers.close().await;
        let producer = self.inner.producer.clone();
        let timeout = self.inner.config.publish_timeout;
        // flush blocks until every queued record is acknowledged (or the timeout).
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
            .map_err(|e| kafka_error("flushing the producer", e));
        let stopped = self.stop_reply_readers().await;
        flushed.and(stopped)
    }

    async fn request(&self, topic: &str, message: Message, timeout: Duration) -> Result<Message> {
        self.request_inner(topic, message, timeout).await
    }

    async fn send_reply(&self, address: &str, reply: Message) -> Result<()> {
        self.send_reply_inner(address, reply).await
    }
}
