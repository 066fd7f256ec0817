//! The broker: topics, publishing, subscriptions and ack handles.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::Notify;

use switchyard_core::{
    validate_name, Acker, Broker, BrokerUrl, Capabilities, Delivery, Error, GroupInfo, Message,
    Nack, Origin, Publisher, Receipt, Result, StartFrom, SubscribeOptions, Subscriber,
    Subscription, TopicInfo,
};

use crate::group::{Entry, Group, Settled};

const BACKEND: &str = "memory";

/// Settings of a memory broker; also accepted as URL parameters
/// (`memory://name?capacity=1000000&publish_timeout_ms=30000&max_message_size=1048576`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Most messages one topic holds (default 1,048,576).
    pub capacity: usize,
    /// How long a publish waits for room in a full topic (default 30 s).
    pub publish_timeout: Duration,
    /// Largest accepted payload, if limited (default: none).
    pub max_message_size: Option<usize>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 20,
            publish_timeout: Duration::from_secs(30),
            max_message_size: None,
        }
    }
}

impl MemoryConfig {
    /// Sets the per-topic capacity.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets how long a publish waits for room.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets the largest accepted payload.
    pub fn max_message_size(mut self, limit: Option<usize>) -> Self {
        self.max_message_size = limit;
        self
    }

    fn from_url(url: &BrokerUrl) -> Result<Self> {
        let mut config = Self::default();
        for (key, _) in &url.params {
            match key.as_str() {
                "capacity" | "publish_timeout_ms" | "max_message_size" => {}
                other => {
                    return Err(Error::config(
                        other,
                        "unknown memory:// setting; known: capacity, publish_timeout_ms, max_message_size",
                    ))
                }
            }
        }
        if let Some(c) = url.param_parse("capacity")? {
            config.capacity = c;
        }
        if let Some(ms) = url.param_parse::<u64>("publish_timeout_ms")? {
            config.publish_timeout = Duration::from_millis(ms);
        }
        if let Some(limit) = url.param_parse("max_message_size")? {
            config.max_message_size = Some(limit);
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.capacity == 0 {
            return Err(Error::config(
                "capacity",
                "must be at least 1 message per topic; the default is 1048576",
            ));
        }
        Ok(())
    }
}

/// The in-memory broker. Clones share the same topics.
///
/// [`MemoryBroker::connect`] with a `memory://name` URL returns the process-wide broker
/// of that name (created on first use, kept while a handle lives), so separate parts of
/// an application that connect by URL see the same topics. [`MemoryBroker::new`] makes a
/// private one.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: MemoryConfig,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    faults: Arc<FaultState>,
}

#[derive(Default)]
struct FaultState {
    failing_publishes: AtomicU64,
    ack_delay_us: AtomicU64,
}

/// Faults to inject into a [`MemoryBroker`], so applications can test how they behave
/// when the broker misbehaves: failing publishes, slow acks, consumers that die.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use switchyard_core::{Message, Publisher};
/// let broker = switchyard_memory::MemoryBroker::new();
/// broker.faults().fail_next_publishes(1);
/// assert!(broker.publish("t", Message::new("x")).await.unwrap_err().is_transient());
/// assert!(broker.publish("t", Message::new("x")).await.is_ok());
/// # });
/// ```
#[derive(Clone)]
pub struct Faults {
    broker: MemoryBroker,
}

impl Faults {
    /// The next `n` publish calls fail with a transient error, publishing nothing.
    pub fn fail_next_publishes(&self, n: u64) {
        self.broker
            .inner
            .faults
            .failing_publishes
            .store(n, Ordering::SeqCst);
    }

    /// Every ack and nack waits `delay` before it takes effect (zero turns it off).
    pub fn delay_acks(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.broker
            .inner
            .faults
            .ack_delay_us
            .store(us, Ordering::SeqCst);
    }

    /// Every current subscription to `topic` dies as if its process crashed: its
    /// unsettled deliveries go to the rest of its group, later settles of them fail with
    /// [`Error::SubscriptionClosed`], and its `recv` returns `None`. Returns how many
    /// subscriptions were dropped.
    pub fn drop_consumers(&self, topic: &str) -> usize {
        let Some(t) = lock(&self.broker.inner.topics).get(topic).cloned() else {
            return 0;
        };
        let dropped = {
            let mut state = lock(&t.state);
            state.groups.iter_mut().map(|(_, g)| g.leave_all()).sum()
        };
        t.changed.notify_waiters();
        dropped
    }
}

struct Topic {
    name: Arc<str>,
    state: Mutex<TopicState>,
    /// Wakes subscribers: something was published, acked, nacked or returned.
    changed: Notify,
    /// Wakes publishers waiting for room.
    room: Notify,
    /// Subscribers about to wait on `changed`; notifying nobody is skipped, which keeps
    /// the ack path cheap. A waiter counts itself before it looks at the state, so a
    /// change made after that look always sees it.
    consumers_waiting: AtomicUsize,
    /// Publishers about to wait on `room`.
    publishers_waiting: AtomicUsize,
}

impl Topic {
    fn wake_consumers(&self) {
        if self.consumers_waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    fn wake_publishers(&self) {
        if self.publishers_waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }
}

/// Counts a waiter for as long as it lives (also when its future is dropped mid-wait).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct TopicState {
    log: VecDeque<Arc<Message>>,
    /// Offset of `log[0]`.
    base: u64,
    groups: Vec<(Arc<str>, Group)>,
    closed: bool,
}

impl TopicState {
    fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    /// Drops messages every group has read, oldest first, until there is room for `need`.
    fn make_room(&mut self, capacity: usize, need: usize) {
        let lowest_read = self
            .groups
            .iter()
            .map(|(_, g)| g.next)
            .min()
            .unwrap_or(u64::MAX);
        while self.log.len() + need > capacity && self.base < lowest_read && !self.log.is_empty() {
            self.log.pop_front();
            self.base += 1;
        }
    }
}

fn registry() -> &'static Mutex<HashMap<String, Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<Inner>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave our state half-written in a way that
    // matters more than stopping every consumer would, so keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
            }),
        }
    }

    /// The shared broker named by a `memory://[name][?settings]` URL.
    pub fn connect(url: &str) -> Result<Self> {
        let parsed = BrokerUrl::parse(url)?;
        if parsed.scheme != "memory" {
            return Err(Error::UnknownScheme {
                scheme: parsed.scheme,
                url: switchyard_core::redact(url),
            });
        }
        let name = parsed.authority.trim_end_matches('/').to_string();
        let config = MemoryConfig::from_url(&parsed)?;
        let mut registry = lock(registry());
        if let Some(inner) = registry.get(&name).and_then(Weak::upgrade) {
            if !parsed.params.is_empty() && inner.config != config {
                return Err(Error::config(
                    "url",
                    format!(
                        "memory broker {name:?} already runs with {:?}; connect without settings to share it, or use another name",
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

    /// Ends every subscription of every topic (their `recv` returns `None`) and refuses
    /// further publishes, for every handle of this broker.
    pub fn shutdown(&self) {
        let topics: Vec<_> = lock(&self.inner.topics).values().cloned().collect();
        for t in topics {
            lock(&t.state).closed = true;
            t.changed.notify_waiters();
            t.room.notify_waiters();
        }
    }

    /// Fault injection for tests (see [`Faults`]).
    pub fn faults(&self) -> Faults {
        Faults {
            broker: self.clone(),
        }
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        let mut topics = lock(&self.inner.topics);
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        validate_name("topic", name)?;
        let topic = Arc::new(Topic {
            name: name.into(),
            state: Mutex::new(TopicState {
                log: VecDeque::new(),
                base: 0,
                groups: Vec::new(),
                closed: false,
            }),
            changed: Notify::new(),
            room: Notify::new(),
            consumers_waiting: AtomicUsize::new(0),
            publishers_waiting: AtomicUsize::new(0),
        });
        topics.insert(name.to_string(), topic.clone());
        Ok(topic)
    }

    /// How many messages `topic` holds and each group's read position and backlog:
    /// `(end_offset, [(group, next_offset)])`. For inspection and tests.
    pub fn topic_stats(&self, topic: &str) -> Option<(u64, Vec<(String, u64)>)> {
        let t = lock(&self.inner.topics).get(topic).cloned()?;
        let state = lock(&t.state);
        let groups = state
            .groups
            .iter()
            .map(|(n, g)| (n.to_string(), g.next))
            .collect();
        Some((state.end(), groups))
    }

    fn check_size(&self, message: &Message) -> Result<()> {
        match self.inner.config.max_message_size {
            Some(limit) if message.payload.len() > limit => Err(Error::MessageTooLarge {
                id: message.id.clone(),
                size: message.payload.len(),
                limit,
                backend: BACKEND,
            }),
            _ => Ok(()),
        }
    }

    async fn append(&self, topic: &str, messages: Vec<Message>) -> Result<Vec<Receipt>> {
        for m in &messages {
            self.check_size(m)?;
        }
        let failing = &self.inner.faults.failing_publishes;
        if failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::transient(BACKEND, "publish failed (injected fault)"));
        }
        let topic = self.topic(topic)?;
        let capacity = self.inner.config.capacity;
        let timeout = self.inner.config.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut receipts = Vec::with_capacity(messages.len());
        let mut pending = messages.into_iter().peekable();
        while pending.peek().is_some() {
            let room = topic.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let _waiting = Waiting::new(&topic.publishers_waiting);
            {
                let mut state = lock(&topic.state);
                if state.closed {
                    return Err(Error::Closed { backend: BACKEND });
                }
                let want = pending.len();
                state.make_room(capacity, want.min(capacity));
                let fit = capacity.saturating_sub(state.log.len()).min(want);
                if fit > 0 {
                    for m in pending.by_ref().take(fit) {
                        let offset = state.end() as i64;
                        receipts.push(Receipt::new(m.id.clone(), None, Some(offset)));
                        state.log.push_back(Arc::new(m));
                    }
                    drop(state);
                    topic.wake_consumers();
                    continue;
                }
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(Error::Timeout {
                    after: timeout,
                    what: format!(
                        "room in memory topic {:?} (capacity {capacity} messages; a group is not keeping up)",
                        &*topic.name
                    ),
                });
            }
        }
        Ok(receipts)
    }
}

#[async_trait]
impl Publisher for MemoryBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        let mut r = self.append(topic, vec![message]).await?;
        Ok(r.pop().expect("one receipt per message"))
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<Vec<Receipt>> {
        self.append(topic, messages).await
    }
}

#[async_trait]
impl Subscriber for MemoryBroker {
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        options.validate()?;
        let topic = self.topic(&options.topic)?;
        let (group, member) = {
            let mut state = lock(&topic.state);
            let idx = match state.groups.iter().position(|(n, _)| **n == *options.group) {
                Some(i) => i,
                None => {
                    let start = match options.start {
                        StartFrom::Latest => state.end(),
                        _ => state.base,
                    };
                    state
                        .groups
                        .push((options.group.as_str().into(), Group::new(start)));
                    state.groups.len() - 1
                }
            };
            let member = state.groups[idx].1.join();
            (idx, member)
        };
        let group_name = lock(&topic.state).groups[group].0.clone();
        Ok(Box::new(MemorySubscription {
            faults: self.inner.faults.clone(),
            topic,
            group,
            group_name,
            member,
            prefetch: options.prefetch,
            scratch: Vec::new(),
            closed: false,
        }))
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
            durable_attempts: true,
            native_dead_letter: false,
            delayed_delivery: false,
            max_message_size: self.inner.config.max_message_size,
        }
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        let t = lock(&self.inner.topics).get(topic).cloned();
        let Some(t) = t else {
            return Ok(0);
        };
        let state = lock(&t.state);
        let end = state.end();
        Ok(match state.groups.iter().find(|(n, _)| **n == *group) {
            Some((_, g)) => end - g.acked_below(),
            // A group that never subscribed has read nothing.
            None => end - state.base,
        })
    }

    async fn topics(&self) -> Result<Vec<TopicInfo>> {
        let topics: Vec<_> = lock(&self.inner.topics).values().cloned().collect();
        let mut out: Vec<TopicInfo> = topics
            .iter()
            .map(|t| {
                let state = lock(&t.state);
                let end = state.end();
                let groups = state
                    .groups
                    .iter()
                    .map(|(name, g)| GroupInfo::new(name.to_string(), Some(end - g.acked_below())))
                    .collect();
                TopicInfo::new(t.name.to_string(), Some(state.log.len() as u64), groups)
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Releases this handle only: a memory broker's topics are shared by every handle
    /// (and every `memory://name` connection), and live while one does. Use
    /// [`MemoryBroker::shutdown`] to end every subscription.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

struct MemorySubscription {
    faults: Arc<FaultState>,
    topic: Arc<Topic>,
    group: usize,
    group_name: Arc<str>,
    member: u64,
    prefetch: usize,
    scratch: Vec<Entry>,
    closed: bool,
}

impl MemorySubscription {
    fn deliver(&self, entry: Entry) -> Delivery {
        let origin = Origin::new(
            self.topic.name.clone(),
            self.group_name.clone(),
            None,
            Some(entry.offset as i64),
        );
        let acker = MemoryAcker {
            topic: self.topic.clone(),
            group: self.group,
            member: self.member,
            offset: entry.offset,
            faults: self.faults.clone(),
        };
        Delivery::new(entry.message, entry.attempt, origin, acker)
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn recv_many(&mut self, buf: &mut Vec<Delivery>, max: usize) -> Result<usize> {
        if self.closed {
            return Ok(0);
        }
        loop {
            let changed = self.topic.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let _waiting = Waiting::new(&self.topic.consumers_waiting);
            {
                let mut state = lock(&self.topic.state);
                if state.closed {
                    return Ok(0);
                }
                let state = &mut *state;
                let group = &mut state.groups[self.group].1;
                if !group.is_member(self.member) {
                    // Dropped by fault injection: behave like a dead consumer's stream.
                    self.closed = true;
                    return Ok(0);
                }
                let credit = self.prefetch.saturating_sub(group.unsettled(self.member));
                let before = group.next;
                group.take(
                    self.member,
                    max.min(credit),
                    &state.log,
                    state.base,
                    &mut self.scratch,
                );
                if group.next != before {
                    // Reading moved this group on, which may let publishers evict.
                    self.topic.wake_publishers();
                }
            }
            if !self.scratch.is_empty() {
                let n = self.scratch.len();
                let entries = std::mem::take(&mut self.scratch);
                buf.extend(entries.into_iter().map(|e| self.deliver(e)));
                return Ok(n);
            }
            changed.await;
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.closed = true;
        let returned = {
            let mut state = lock(&self.topic.state);
            let group = &mut state.groups[self.group].1;
            let n = group.leave(self.member);
            n > 0 || group.has_ready()
        };
        if returned {
            self.topic.wake_consumers();
        }
        Ok(())
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        if !self.closed {
            // Dropped without close: behave like a consumer that died, whose unsettled
            // messages go to the rest of the group.
            let mut state = lock(&self.topic.state);
            state.groups[self.group].1.leave(self.member);
            drop(state);
            self.topic.wake_consumers();
        }
    }
}

struct MemoryAcker {
    topic: Arc<Topic>,
    group: usize,
    member: u64,
    offset: u64,
    faults: Arc<FaultState>,
}

impl MemoryAcker {
    fn settle(&self, nack: Option<Nack>) -> Result<()> {
        let outcome = {
            let mut state = lock(&self.topic.state);
            state.groups[self.group]
                .1
                .settle(self.member, self.offset, nack)
        };
        match outcome {
            Settled::Done => {
                self.topic.wake_consumers();
                Ok(())
            }
            Settled::MemberGone => Err(Error::SubscriptionClosed {
                id: format!("{}@{}", self.topic.name, self.offset),
            }),
        }
    }
}

impl MemoryAcker {
    fn ack_delay(&self) -> Option<Duration> {
        match self.faults.ack_delay_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn settle_later(&self, nack: Option<Nack>) -> BoxFuture<'_, Result<()>> {
        match self.ack_delay() {
            None => Box::pin(futures::future::ready(self.settle(nack))),
            Some(delay) => Box::pin(async move {
                tokio::time::sleep(delay).await;
                self.settle(nack)
            }),
        }
    }
}

impl Acker for MemoryAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        self.settle_later(None)
    }

    fn nack(&self, action: Nack) -> BoxFuture<'_, Result<()>> {
        self.settle_later(Some(action))
    }

    fn dropped_unsettled(&self) {
        let _ = self.settle(Some(Nack::Requeue));
    }

    fn try_ack_now(&self) -> Option<Result<()>> {
        match self.ack_delay() {
            None => Some(self.settle(None)),
            Some(_) => None,
        }
    }
}
