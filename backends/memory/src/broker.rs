//! The broker: its handles, the registry of named brokers, topics by name, and what it
//! reports (capabilities, lag, topics).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use switchyard_core::backend::rpc::Requester;
use switchyard_core::backend::{validate_name, BrokerUrl};
use switchyard_core::{Broker, Capabilities, Error, GroupInfo, Message, Result, TopicInfo};

use crate::config::MemoryConfig;
use crate::faults::{FaultState, Faults};
use crate::topic::Topic;

/// The backend's name in errors and reports.
pub(crate) const BACKEND: &str = "memory";

/// The in-memory broker. Clones share the same topics.
///
/// [`MemoryBroker::connect`] with a `memory://name` URL returns the process-wide broker
/// of that name (created on first use, kept while a handle lives), so separate parts of
/// an application that connect by URL see the same topics. [`MemoryBroker::new`] makes a
/// private one.
///
/// Requests ([`Broker::request`]) get their replies in process: a responder's reply goes
/// straight to the requester's inbox, a channel, not across a topic; [`Broker::close`]
/// ends them.
#[derive(Clone)]
pub struct MemoryBroker {
    pub(crate) inner: Arc<Inner>,
}

/// What every handle of one broker shares.
pub(crate) struct Inner {
    pub(crate) config: MemoryConfig,
    pub(crate) topics: Mutex<HashMap<String, Arc<Topic>>>,
    pub(crate) faults: Arc<FaultState>,
    /// The pending requests of every handle, made on the first request.
    pub(crate) requester: Requester,
    /// The inbox their replies go to.
    pub(crate) replies: crate::rpc::Replies,
    /// Scheduled messages waiting to be published.
    pub(crate) timers: crate::schedule::Timers,
}

/// The brokers `memory://name` URLs name, while a handle of each lives.
static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<Inner>>>> = LazyLock::new(Default::default);

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A private broker with default settings.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A private broker with these settings.
    pub fn with_config(config: MemoryConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                topics: Mutex::new(HashMap::new()),
                faults: Arc::default(),
                requester: Requester::new(BACKEND),
                replies: Default::default(),
                timers: Default::default(),
            }),
        }
    }

    /// The shared broker named by a `memory://[name][?settings]` URL.
    pub fn connect(url: &str) -> Result<Self> {
        let parsed = BrokerUrl::parse(url)?;
        if parsed.scheme != "memory" {
            return Err(Error::UnknownScheme {
                scheme: parsed.scheme,
                url: switchyard_core::backend::redact(url),
            });
        }
        let name = parsed.authority.trim_end_matches('/').to_string();
        let config = MemoryConfig::from_url(&parsed)?;
        let mut registry = REGISTRY.lock();
        if let Some(inner) = registry.get(&name).and_then(Weak::upgrade) {
            if !parsed.params.is_empty() && inner.config != config {
                return Err(Error::config(
                    "url",
                    format!(
                        "memory broker {:?} already runs with {:?}; connect without settings to share it, or use another name",
                        switchyard_core::backend::redact(&format!("memory://{name}")),
                        inner.config
                    ),
                ));
            }
            return Ok(Self { inner });
        }
        let broker = Self::with_config(config);
        registry.insert(name, Arc::downgrade(&broker.inner));
        Ok(broker)
    }

    /// The settings in force.
    pub fn config(&self) -> &MemoryConfig {
        &self.inner.config
    }

    /// Ends every subscription of every topic (their `recv` returns `None`), pending
    /// requests, and refuses further publishes and requests, for every handle of this
    /// broker. Scheduled messages not yet due are dropped.
    pub fn shutdown(&self) {
        // Pending requests end with a closed error rather than a lost inbox.
        self.inner.requester.close();
        self.inner.timers.cancel_all();
        let topics: Vec<_> = self.inner.topics.lock().values().cloned().collect();
        for t in topics {
            t.state.lock().closed = true;
            t.changed.notify_waiters();
            t.room.notify_waiters();
        }
    }

    /// Fault injection for tests (see [`Faults`]).
    pub fn faults(&self) -> Faults {
        Faults::new(self.clone())
    }

    /// The topic `name`, made on first use.
    pub(crate) fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        let mut topics = self.inner.topics.lock();
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        validate_name("topic", name)?;
        let topic = Arc::new(Topic::new(name));
        topics.insert(name.to_string(), topic.clone());
        Ok(topic)
    }

    /// How many messages `topic` holds and each group's read position and backlog:
    /// `(end_offset, [(group, next_offset)])`. For inspection and tests.
    pub fn topic_stats(&self, topic: &str) -> Option<(u64, Vec<(String, u64)>)> {
        let t = self.inner.topics.lock().get(topic).cloned()?;
        let state = t.state.lock();
        let groups = state
            .groups
            .iter()
            .map(|(n, g)| (n.to_string(), g.next))
            .collect();
        Some((state.end(), groups))
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            replay: true,
            persistent: false,
            per_key_order: true,
            durable_delivery_counts: true,
            native_dead_letter: false,
            delayed_delivery: false,
            max_message_size: self.inner.config.max_message_size,
            request_reply: true,
            at_most_once: true,
            scheduled_publish: true,
        }
    }

    /// A tokio timer per message, publishing it when due; dropped, message and all, by
    /// [`MemoryBroker::shutdown`] or when the broker's last handle goes.
    async fn publish_at(
        &self,
        topic: &str,
        message: switchyard_core::Message,
        when: std::time::SystemTime,
    ) -> Result<switchyard_core::Receipt> {
        self.schedule(topic, message, when).await
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        let t = self.inner.topics.lock().get(topic).cloned();
        let Some(t) = t else {
            return Ok(0);
        };
        let mut state = t.state.lock();
        let end = state.end();
        let base = state.base;
        Ok(match state.groups.iter_mut().find(|(n, _)| **n == *group) {
            Some((_, g)) => end - g.acked_below(),
            // A group that never subscribed has read nothing.
            None => end - base,
        })
    }

    async fn topics(&self) -> Result<Vec<TopicInfo>> {
        let topics: Vec<_> = self.inner.topics.lock().values().cloned().collect();
        let mut out: Vec<TopicInfo> = topics
            .iter()
            .map(|t| {
                let mut state = t.state.lock();
                let end = state.end();
                let groups = state
                    .groups
                    .iter_mut()
                    .map(|(name, g)| GroupInfo::new(name.to_string(), Some(end - g.acked_below())))
                    .collect();
                TopicInfo::new(t.name.to_string(), Some(state.log.len() as u64), groups)
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Ends the broker's pending requests with [`Error::Closed`] (later requests fail
    /// so: request/reply is closed for every handle of this broker), and otherwise
    /// releases this handle only: a memory broker's topics are shared by every handle
    /// (and every `memory://name` connection), and live while one does. Use
    /// [`MemoryBroker::shutdown`] to end every subscription.
    async fn close(&self) -> Result<()> {
        self.inner.requester.close();
        Ok(())
    }

    async fn request(&self, topic: &str, message: Message, timeout: Duration) -> Result<Message> {
        self.inner
            .requester
            .request(
                self,
                || async { Ok(self.inner.replies.open()) },
                topic,
                message,
                timeout,
            )
            .await
    }

    async fn send_reply(&self, address: &str, reply: Message) -> Result<()> {
        self.inner.replies.send(address, reply).await
    }
}
