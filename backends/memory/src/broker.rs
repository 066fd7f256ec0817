//! The broker: topics, publishing, subscriptions and ack handles.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::Notify;

use switchyard_core::{
    check_headers, validate_name, Acker, Broker, BrokerUrl, Capabilities, Delivery, Error,
    GroupInfo, Message, Nack, Origin, Publisher, Receipt, Result, StartFrom, SubscribeOptions,
    Subscriber, Subscription, TopicInfo,
};

use crate::group::{AckQueue, Entry, Group, Settled};

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
            let n = state.groups.iter_mut().map(|(_, g)| g.leave_all()).sum();
            state.drop_expired();
            n
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
    /// Appends as many of `pending` (from the front) as there is room for, evicting
    /// messages every group has read if need be. Returns the first one's offset and how
    /// many went in, or `None` if none fit.
    fn put(
        &self,
        pending: &mut Vec<Arc<Message>>,
        capacity: usize,
    ) -> Result<Option<(u64, usize)>> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(Error::Closed { backend: BACKEND });
        }
        let want = pending.len();
        state.make_room(capacity, want.min(capacity));
        let fit = capacity.saturating_sub(state.log.len()).min(want);
        if fit == 0 {
            return Ok(None);
        }
        let first = state.end();
        state.log.extend(pending.drain(..fit));
        Ok(Some((first, fit)))
    }

    /// Wakes waiting subscribers; whether there were any.
    fn wake_consumers(&self) -> bool {
        let waiting = self.consumers_waiting.load(Ordering::SeqCst) > 0;
        if waiting {
            self.changed.notify_waiters();
        }
        waiting
    }

    fn wake_publishers(&self) {
        if self.publishers_waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }
}

/// How many messages one publish call must add before it reschedules itself after
/// waking consumers (see `append`).
const RESCHEDULE_AFTER: usize = 16;

/// Returns `Pending` once after waking its own task: the task goes back to its
/// scheduler's queue at once (unlike `tokio::task::yield_now`, which waits until the
/// worker is otherwise idle, so the woken consumers would run first and alone).
struct Reschedule(bool);

impl std::future::Future for Reschedule {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
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

    /// Drops ephemeral groups whose last member left: their read position no longer
    /// holds messages in the log, and nobody lists them.
    fn drop_expired(&mut self) {
        self.groups.retain(|(_, g)| !g.expired());
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
                        "memory broker {:?} already runs with {:?}; connect without settings to share it, or use another name",
                        switchyard_core::redact(&format!("memory://{name}")),
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
            check_headers(m)?;
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
        // Everything that allocates happens before taking the topic's lock, which every
        // member of every group also takes: the receipts (offsets filled in below) and
        // the shared messages.
        let mut receipts: Vec<Receipt> = messages
            .iter()
            .map(|m| Receipt::new(m.id.clone(), None, None))
            .collect();
        let mut pending: Vec<Arc<Message>> = messages.into_iter().map(Arc::new).collect();
        let mut published = 0;
        let mut woke = false;
        while !pending.is_empty() {
            // Look for room first without registering as a waiter; register and look
            // again only when there is none, so a change made meanwhile is not missed.
            let first = topic.put(&mut pending, capacity)?;
            let (first, fit) = match first {
                Some(put) => put,
                None => {
                    let room = topic.room.notified();
                    tokio::pin!(room);
                    room.as_mut().enable();
                    let _waiting = Waiting::new(&topic.publishers_waiting);
                    match topic.put(&mut pending, capacity)? {
                        Some(put) => put,
                        None => {
                            if tokio::time::timeout_at(deadline, room).await.is_err() {
                                return Err(Error::Timeout {
                                    after: timeout,
                                    what: format!(
                                        "room in memory topic {:?} (capacity {capacity} messages; a group is not keeping up)",
                                        &*topic.name
                                    ),
                                });
                            }
                            continue;
                        }
                    }
                }
            };
            for (i, receipt) in receipts[published..published + fit].iter_mut().enumerate() {
                receipt.offset = Some((first + i as u64) as i64);
            }
            published += fit;
            woke |= topic.wake_consumers();
        }
        if woke && published >= RESCHEDULE_AFTER {
            // Let the consumers just woken run elsewhere. Tokio puts a task woken from a
            // worker in that worker's next-task slot, which other workers cannot steal:
            // a publisher that never waits (a memory topic with room) would keep them
            // from running until it stops publishing. Rescheduling itself puts this task
            // in the run queue, where an idle worker steals it, and the woken consumers
            // run here: both sides keep going in parallel. Only after a batch: a single
            // publish (say from a handler) stays a call that does not suspend.
            Reschedule(false).await;
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
        let group = {
            let mut state = lock(&topic.state);
            let idx = match state.groups.iter().position(|(n, _)| **n == *options.group) {
                Some(i) if state.groups[i].1.ephemeral != options.ephemeral => {
                    return Err(Error::config(
                        "ephemeral",
                        format!(
                            "group {:?} of topic {:?} is {}; all its members must agree",
                            options.group,
                            options.topic,
                            if state.groups[i].1.ephemeral {
                                "ephemeral"
                            } else {
                                "not ephemeral"
                            }
                        ),
                    ));
                }
                Some(i) => i,
                None => {
                    let start = match options.start {
                        StartFrom::Latest => state.end(),
                        _ => state.base,
                    };
                    let mut group = Group::new(start);
                    group.ephemeral = options.ephemeral;
                    state.groups.push((options.group.as_str().into(), group));
                    state.groups.len() - 1
                }
            };
            let (member, acks) = state.groups[idx].1.join();
            (state.groups[idx].0.clone(), member, acks)
        };
        let (group_name, member, acks) = group;
        Ok(Box::new(MemorySubscription {
            link: Arc::new(MemberLink {
                topic,
                group_name,
                member,
                acks,
                faults: self.inner.faults.clone(),
            }),
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
        let mut state = lock(&t.state);
        let end = state.end();
        let base = state.base;
        Ok(match state.groups.iter_mut().find(|(n, _)| **n == *group) {
            Some((_, g)) => end - g.acked_below(),
            // A group that never subscribed has read nothing.
            None => end - base,
        })
    }

    async fn topics(&self) -> Result<Vec<TopicInfo>> {
        let topics: Vec<_> = lock(&self.inner.topics).values().cloned().collect();
        let mut out: Vec<TopicInfo> = topics
            .iter()
            .map(|t| {
                let mut state = lock(&t.state);
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

    /// Releases this handle only: a memory broker's topics are shared by every handle
    /// (and every `memory://name` connection), and live while one does. Use
    /// [`MemoryBroker::shutdown`] to end every subscription.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// What a subscription and every ack handle it gives out share: one reference count
/// per delivery instead of one per field.
struct MemberLink {
    topic: Arc<Topic>,
    /// The group's name as the topic holds it: the same allocation, so it tells this
    /// group from a later one of the same name (an ephemeral group dropped and made
    /// again).
    group_name: Arc<str>,
    member: u64,
    acks: Arc<AckQueue>,
    faults: Arc<FaultState>,
}

struct MemorySubscription {
    link: Arc<MemberLink>,
    prefetch: usize,
    scratch: Vec<Entry>,
    closed: bool,
}

/// What one look at the topic found.
enum Took {
    /// Entries are waiting in the scratch buffer.
    Some,
    /// Nothing to hand out now.
    Nothing,
    /// The subscription is over.
    Closed,
}

impl MemorySubscription {
    fn deliver(&self, entry: Entry) -> Delivery {
        let acker = MemoryAcker {
            link: self.link.clone(),
            offset: entry.offset,
        };
        let origin = Origin::new(
            self.link.topic.name.clone(),
            self.link.group_name.clone(),
            None,
            Some(entry.offset as i64),
        );
        Delivery::new(entry.message, entry.attempt, origin, acker)
    }

    /// Takes up to `max` deliverable entries (within the prefetch window) into `scratch`.
    fn take(&mut self, max: usize) -> Took {
        let topic = &self.link.topic;
        let mut state = lock(&topic.state);
        if state.closed {
            return Took::Closed;
        }
        let state = &mut *state;
        let Some(group) = group_of(&mut state.groups, &self.link.group_name) else {
            // Dropped by fault injection, its ephemeral group with it.
            self.closed = true;
            return Took::Closed;
        };
        if !group.is_member(self.link.member) {
            // Dropped by fault injection: behave like a dead consumer's stream.
            self.closed = true;
            return Took::Closed;
        }
        group.apply_acks();
        let credit = self
            .prefetch
            .saturating_sub(group.unsettled(self.link.member));
        let before = group.next;
        group.take(
            self.link.member,
            max.min(credit),
            &state.log,
            state.base,
            &mut self.scratch,
        );
        if group.next != before {
            // Reading moved this group on, which may let publishers evict.
            topic.wake_publishers();
        }
        if self.scratch.is_empty() {
            Took::Nothing
        } else {
            Took::Some
        }
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn recv_many(&mut self, buf: &mut Vec<Delivery>, max: usize) -> Result<usize> {
        if self.closed {
            return Ok(0);
        }
        loop {
            // Look first without registering as a waiter (registering takes the Notify's
            // lock); register and look again only when there was nothing, so a change
            // made in between is still seen.
            let mut took = self.take(max);
            if let Took::Nothing = took {
                let topic = self.link.topic.clone();
                let changed = topic.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let _waiting = Waiting::new(&topic.consumers_waiting);
                took = self.take(max);
                if let Took::Nothing = took {
                    changed.await;
                    continue;
                }
            }
            if let Took::Closed = took {
                return Ok(0);
            }
            let n = self.scratch.len();
            let mut entries = std::mem::take(&mut self.scratch);
            buf.reserve(n);
            buf.extend(entries.drain(..).map(|e| self.deliver(e)));
            self.scratch = entries;
            return Ok(n);
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.closed = true;
        let topic = &self.link.topic;
        let returned = {
            let mut state = lock(&topic.state);
            match group_of(&mut state.groups, &self.link.group_name) {
                Some(group) => {
                    let n = group.leave(self.link.member);
                    let returned = n > 0 || group.has_ready();
                    state.drop_expired();
                    returned
                }
                None => false,
            }
        };
        if returned {
            topic.wake_consumers();
        }
        Ok(())
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        if !self.closed {
            // Dropped without close: behave like a consumer that died, whose unsettled
            // messages go to the rest of the group.
            let topic = &self.link.topic;
            let mut state = lock(&topic.state);
            if let Some(group) = group_of(&mut state.groups, &self.link.group_name) {
                group.leave(self.link.member);
                state.drop_expired();
            }
            drop(state);
            topic.wake_consumers();
        }
    }
}

/// The group `name` (this very allocation of the name, see [`MemberLink`]) among a
/// topic's groups; `None` once it was dropped. Topics have few groups, so a scan costs
/// less than the lock around it.
fn group_of<'a>(groups: &'a mut [(Arc<str>, Group)], name: &Arc<str>) -> Option<&'a mut Group> {
    groups
        .iter_mut()
        .find(|(n, _)| Arc::ptr_eq(n, name))
        .map(|(_, g)| g)
}

struct MemoryAcker {
    link: Arc<MemberLink>,
    offset: u64,
}

impl MemoryAcker {
    /// Settles under the topic's lock: nacks, and returns of dropped deliveries.
    fn settle(&self, nack: Option<Nack>) -> Result<()> {
        let link = &self.link;
        let outcome = {
            let mut state = lock(&link.topic.state);
            match group_of(&mut state.groups, &link.group_name) {
                Some(group) => group.settle(link.member, self.offset, nack),
                // An ephemeral group dropped with its last member.
                None => Settled::MemberGone,
            }
        };
        match outcome {
            Settled::Done => {
                link.topic.wake_consumers();
                Ok(())
            }
            Settled::MemberGone => Err(self.gone()),
        }
    }

    /// Acks by recording the offset in the member's queue; the group applies it before
    /// it next hands anything out (see [`AckQueue`]).
    fn ack_now(&self) -> Result<()> {
        if self.link.acks.push(self.offset) {
            // Someone may be waiting for room in the prefetch window or for this key.
            self.link.topic.wake_consumers();
            Ok(())
        } else {
            Err(self.gone())
        }
    }

    fn gone(&self) -> Error {
        Error::SubscriptionClosed {
            id: format!("{}@{}", self.link.topic.name, self.offset),
        }
    }

    fn ack_delay(&self) -> Option<Duration> {
        match self.link.faults.ack_delay_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn settle_later(&self, nack: Option<Nack>) -> BoxFuture<'_, Result<()>> {
        let settle = move || match nack {
            None => self.ack_now(),
            Some(_) => self.settle(nack),
        };
        match self.ack_delay() {
            None => Box::pin(futures::future::ready(settle())),
            Some(delay) => Box::pin(async move {
                tokio::time::sleep(delay).await;
                settle()
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
}
