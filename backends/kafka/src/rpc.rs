//! Request/reply on Kafka: a reply topic per broker client, read by assignment.
//!
//! On its first request a client creates its own topic `sy.reply.<random>` (one
//! partition; or the stable name given to [`KafkaBroker::set_reply_topic`]) and reads
//! partition 0 with a consumer *assigned* it, from its end offset, without joining a
//! group (a group join costs seconds on tansu, and the topic has one reader anyway).
//! Requests name that topic in `x-reply-to`; a reply is a record produced to it,
//! partition 0.
//!
//! A topic per client rather than a partition per client of one shared topic: Kafka
//! has no lease a process could hold on a partition without a group join, so two
//! processes could claim the same one; a topic name with 80 random bits cannot clash,
//! and costs one topic creation per client lifetime, not per request.
//!
//! `close` leaves the topic in place. On tansu 0.6, deleting a topic that other
//! librdkafka clients have written to makes them crash (a segmentation fault in
//! librdkafka's metadata cache) on their next write to it: every responder that ever
//! answered the client. So a random reply topic outlives its client (one empty-ish
//! topic per client lifetime), and a process with a stable identity reuses its own
//! through [`KafkaBroker::set_reply_topic`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use switchyard_core::backend::rpc::pubsub::{new_reply_topic, REPLY_TOPIC_PREFIX};
use switchyard_core::backend::rpc::{Inbox, Requester};
use switchyard_core::backend::{check_headers, validate_name};
use switchyard_core::{Error, Message, Result};
use tokio::sync::mpsc;

use crate::broker::{config_error, kafka_error, KafkaBroker, BACKEND};
use crate::record;

/// How long the inbox's reader waits in one poll; also how soon it notices the
/// requester is gone when no reply comes.
const POLL: Duration = Duration::from_millis(100);
/// Replies the reader may hold before the requester takes them.
const INBOX_BUFFER: usize = 4096;
/// How long the reply producer waits for a topic to appear before failing a reply to
/// it: a reply topic exists before any request names it, so a missing one is gone (its
/// client closed) and waiting librdkafka's default 30 s would only stall the responder.
const PROPAGATION_MS: &str = "1000";

/// A client's request/reply state: its pending requests, the reply topics it made,
/// and the producer its replies (as a responder) go out with.
pub(crate) struct Replies {
    /// Pending requests by correlation id, and the inbox.
    pub(crate) requester: Requester,
    /// The reply topic, chosen once: a new inbox (after one was lost) reads it again.
    topic: Mutex<Option<String>>,
    /// Made on the first reply sent.
    producer: Mutex<Option<FutureProducer>>,
    /// Reply topics seen to exist, so the look-up costs one round trip per requester.
    known: Mutex<HashSet<String>>,
    /// The inbox readers' stop flags and threads, stopped by `close`.
    readers: Mutex<Vec<(Arc<AtomicBool>, JoinHandle<()>)>>,
}

impl Replies {
    pub(crate) fn new() -> Self {
        Self {
            requester: Requester::new(BACKEND),
            topic: Mutex::new(None),
            producer: Mutex::new(None),
            known: Mutex::new(HashSet::new()),
            readers: Mutex::new(Vec::new()),
        }
    }
}

impl KafkaBroker {
    /// This client's reply topic: the one set with [`KafkaBroker::set_reply_topic`], or
    /// the one it created on its first request; `None` before either.
    pub fn reply_topic(&self) -> Option<String> {
        self.inner.replies.topic.lock().clone()
    }

    /// Names the reply topic this client reads (created if missing), instead of a new
    /// `sy.reply.<random>` per client: a process with a stable identity (a pod of a
    /// stateful set, a numbered worker) reuses its topic across restarts, so none is
    /// left behind. The name starts with `sy.reply.` and must not be used by two live
    /// clients at once (each would receive, and drop, the other's replies). Call it
    /// before the first request; afterwards only the same name is accepted.
    pub fn set_reply_topic(&self, name: &str) -> Result<()> {
        validate_name("reply topic", name)?;
        if !name.starts_with(REPLY_TOPIC_PREFIX) || name.len() == REPLY_TOPIC_PREFIX.len() {
            return Err(Error::config(
                "reply topic",
                format!("{name:?} must start with {REPLY_TOPIC_PREFIX:?} and go on after it"),
            ));
        }
        let mut topic = self.inner.replies.topic.lock();
        match topic.as_deref() {
            Some(current) if current != name => Err(Error::config(
                "reply topic",
                format!("this client already reads the reply topic {current:?}; set the name before its first request"),
            )),
            _ => {
                *topic = Some(name.to_string());
                Ok(())
            }
        }
    }

    /// `Broker::request`: the requester with this client's inbox.
    pub(crate) async fn request_inner(
        &self,
        topic: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<Message> {
        self.check_open()?;
        self.inner
            .replies
            .requester
            .request(self, || self.open_inbox(), topic, message, timeout)
            .await
    }

    /// Creates the reply topic if needed and reads it by assignment, from its end.
    async fn open_inbox(&self) -> Result<Inbox> {
        self.check_open()?;
        let topic = self
            .inner
            .replies
            .topic
            .lock()
            .get_or_insert_with(new_reply_topic)
            .clone();
        self.create_reply_topic(&topic).await?;
        let consumer: BaseConsumer = self
            .inner
            .config
            .consumer(&topic, true)
            .create()
            .map_err(|e| config_error("reply consumer", e))?;
        let timeout = self.inner.config.publish_timeout;
        let name = topic.clone();
        // The end offset read before any request names the topic, so no reply can be
        // written before it (librdkafka's "latest" is resolved later, and could skip
        // one); replies left from an earlier run of a reused topic are not read.
        let consumer = tokio::task::spawn_blocking(move || -> Result<BaseConsumer> {
            let (_, end) = consumer
                .fetch_watermarks(&name, 0, timeout)
                .map_err(|e| kafka_error(format!("reading the end of reply topic {name:?}"), e))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&name, 0, Offset::Offset(end))
                .map_err(|e| kafka_error("assigning the reply topic", e))?;
            consumer
                .assign(&tpl)
                .map_err(|e| kafka_error(format!("assigning the reply topic {name:?}"), e))?;
            Ok(consumer)
        })
        .await
        .map_err(|e| Error::permanent(BACKEND, e.to_string()))??;
        let (tx, rx) = mpsc::channel(INBOX_BUFFER);
        let name = topic.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sy-kafka-replies".into())
            .spawn(move || read_replies(consumer, &name, tx, &stopped))
            .map_err(|e| Error::permanent(BACKEND, e))?;
        self.inner.replies.readers.lock().push((stop, thread));
        let replies = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|reply| (reply, rx))
        })
        .boxed();
        Ok(Inbox::new(topic, replies))
    }

    /// Creates `topic` with one partition (replication from the config); one that
    /// exists already (a reused name) is fine.
    async fn create_reply_topic(&self, topic: &str) -> Result<()> {
        let timeout = self.inner.config.publish_timeout;
        let new = NewTopic::new(
            topic,
            1,
            TopicReplication::Fixed(self.inner.config.replication),
        );
        let opts = AdminOptions::new()
            .request_timeout(Some(timeout))
            .operation_timeout(Some(timeout));
        let what = || format!("creating the reply topic {topic:?} on {}", self.servers());
        let results = tokio::time::timeout(timeout, self.inner.admin.create_topics([&new], &opts))
            .await
            .map_err(|_| self.unreachable(timeout, format!("reply topic {topic:?} to be created")))?
            .map_err(|e| kafka_error(what(), e))?;
        for r in results {
            match r {
                Ok(_) => tracing::debug!(topic, "created a reply topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(kafka_error(what(), KafkaError::AdminOp(code))),
            }
        }
        Ok(())
    }

    /// Stops the inbox readers (from `close`), so their consumers are gone when it
    /// returns. The topic stays: see the module's notes on deletion.
    pub(crate) async fn stop_reply_readers(&self) -> Result<()> {
        let readers = std::mem::take(&mut *self.inner.replies.readers.lock());
        if readers.is_empty() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || {
            for (stop, thread) in readers {
                stop.store(true, Ordering::Release);
                let _ = thread.join();
            }
        })
        .await
        .map_err(|e| Error::permanent(BACKEND, e.to_string()))
    }

    /// `Broker::send_reply`: produces `reply` to partition 0 of the reply topic
    /// `address`. Only `sy.reply.` topics are accepted, and none is created: a missing
    /// one belonged to a client that has closed, a permanent error (the responder acks).
    pub(crate) async fn send_reply_inner(&self, address: &str, reply: Message) -> Result<()> {
        self.check_open()?;
        if !address.starts_with(REPLY_TOPIC_PREFIX) {
            return Err(Error::config(
                "reply address",
                format!(
                    "{address:?} is not a reply topic (they start with {REPLY_TOPIC_PREFIX:?}); the request's x-reply-to header was not written by a switchyard requester on Kafka"
                ),
            ));
        }
        validate_name("reply address", address)?;
        check_headers(&reply)?;
        record::check_header_names(&reply)?;
        self.check_reply_topic(address).await?;
        let producer = self.reply_producer()?;
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(address)
            .partition(0)
            .payload(&reply.payload[..])
            .headers(record::headers(&reply))
            .timestamp(record::millis(reply.timestamp));
        if let Some(key) = &reply.key {
            rec = rec.key(key.as_str());
        }
        let delivery = loop {
            match producer.send_result(rec) {
                Ok(f) => break f,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(self.reply_error(address, e).await),
            }
        };
        match delivery.await {
            Err(_) => Err(Error::Closed { backend: BACKEND }),
            Ok(Err((e, _))) => Err(self.reply_error(address, e).await),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Fails permanently unless the reply topic `address` exists. Looked up once per
    /// topic, from the whole topic list: librdkafka 2.x can crash on the metadata
    /// tansu returns when a producer asks for one topic that does not exist, so a
    /// reply is never produced to a topic not seen to exist.
    async fn check_reply_topic(&self, address: &str) -> Result<()> {
        if self.inner.replies.known.lock().contains(address) {
            return Ok(());
        }
        if !self.topic_listed(address).await? {
            return Err(self.requester_gone(address));
        }
        self.inner.replies.known.lock().insert(address.to_string());
        Ok(())
    }

    /// Whether `topic` is in the broker's topic list (one metadata round trip).
    async fn topic_listed(&self, topic: &str) -> Result<bool> {
        let producer = self.inner.producer.clone();
        let timeout = self.inner.config.publish_timeout;
        // fetch_metadata blocks on a network round trip.
        let metadata =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout))
                .await
                .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
                .map_err(|e| kafka_error(format!("reading topics from {}", self.servers()), e))?;
        Ok(metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && !t.partitions().is_empty()))
    }

    fn requester_gone(&self, address: &str) -> Error {
        Error::permanent(
            BACKEND,
            format!(
                "the reply topic {address:?} does not exist on {} (its requester has closed); reply dropped",
                self.servers()
            ),
        )
    }

    /// The producer replies go out with, made on first use: the client's settings, not
    /// idempotent, and a missing topic fails fast (see [`PROPAGATION_MS`]).
    fn reply_producer(&self) -> Result<FutureProducer> {
        let mut slot = self.inner.replies.producer.lock();
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let mut config = self.inner.config.producer();
        // Not idempotent: tansu 0.6 panics, and stops serving, on an idempotent write to
        // a topic that no longer exists, which is what a late reply is. A retried reply
        // may arrive twice; the requester drops the second as late.
        config.set("enable.idempotence", "false");
        if !self
            .inner
            .config
            .client
            .iter()
            .any(|(k, _)| k == "topic.metadata.propagation.max.ms")
        {
            config.set("topic.metadata.propagation.max.ms", PROPAGATION_MS);
        }
        let producer: FutureProducer = config
            .create()
            .map_err(|e| config_error("reply producer", e))?;
        *slot = Some(producer.clone());
        Ok(producer)
    }

    /// A failed reply as an error; a topic deleted since it was looked up (tansu then
    /// answers `Unknown`) is the requester gone, a permanent error.
    async fn reply_error(&self, address: &str, e: KafkaError) -> Error {
        let code = e.rdkafka_error_code();
        if matches!(
            code,
            Some(
                RDKafkaErrorCode::Unknown
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::UnknownPartition
            )
        ) {
            self.inner.replies.known.lock().remove(address);
            if let Ok(false) = self.topic_listed(address).await {
                return self.requester_gone(address);
            }
        }
        match code {
            Some(RDKafkaErrorCode::MessageTimedOut) => self.unreachable(
                self.inner.config.publish_timeout,
                format!("a reply to {address:?} to be acknowledged"),
            ),
            _ => kafka_error(
                format!("sending a reply to {address:?} on {}", self.servers()),
                e,
            ),
        }
    }
}

/// Hands the records of the reply topic to the requester until it goes away (the
/// channel closes or `close` stops it) or the topic does (an error ends the inbox; the
/// next request opens a new one). Connection trouble is left to librdkafka, which
/// reconnects.
fn read_replies(
    consumer: BaseConsumer,
    topic: &str,
    tx: mpsc::Sender<Result<Message>>,
    stop: &AtomicBool,
) {
    while !tx.is_closed() && !stop.load(Ordering::Acquire) {
        match consumer.poll(POLL) {
            None => {}
            // The requester went away while the reply was handed over.
            Some(Ok(m)) if tx.blocking_send(Ok(record::to_message(&m))).is_err() => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => match e.rdkafka_error_code() {
                Some(
                    RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::UnknownPartition,
                ) => {
                    let _ = tx.blocking_send(Err(kafka_error(
                        format!("reading the reply topic {topic:?}"),
                        e,
                    )));
                    break;
                }
                _ => {
                    tracing::debug!(topic, error = %e, "reply topic read error; librdkafka retries")
                }
            },
        }
    }
}
