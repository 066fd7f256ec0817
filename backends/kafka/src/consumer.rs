//! One group member: a librdkafka consumer polled by its own thread, the per-key gate,
//! and commits of the contiguous processed watermark.
//!
//! Why a thread and not a tokio task: librdkafka runs rebalance callbacks inside
//! `poll`, and on revocation we wait (bounded) for in-flight messages to finish. That
//! wait must not block a runtime worker, or the handlers it waits for could starve.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use switchyard_core::{
    Acker, Delivery, Error, Message, Nack, Origin, Result, StartFrom, SubscribeOptions,
    Subscription,
};

use crate::broker::{kafka_error, lock, BACKEND};
use crate::config::{CommitStrategy, KafkaConfig};
use crate::record;

/// How long the poll thread blocks in one `poll`; also its reaction time to close.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// Records taken per wake-up before the state lock is taken once for all of them.
const POLL_BATCH: usize = 512;
/// Timeout of the blocking calls made inside a rebalance (committed offsets, watermarks).
const META_TIMEOUT: Duration = Duration::from_secs(10);
/// Payload bytes a member buffers (received, not yet handed out) before it pauses
/// fetching, unless `queued.max.messages.kbytes` (librdkafka's bound on its own prefetch
/// queue, 64 MiB by default too) says otherwise.
const MAX_BUFFERED_BYTES: usize = 64 << 20;

type Key = Arc<str>;

/// A received record as the member holds it.
struct Entry {
    partition: i32,
    offset: i64,
    epoch: u64,
    message: Arc<Message>,
    attempt: u32,
    key: Option<Key>,
}

/// What this member knows of one assigned partition.
struct Part {
    /// Changes on every assignment, so settles of an older assignment are recognised.
    epoch: u64,
    /// Offsets received and not yet done (acked or rejected).
    pending: BTreeSet<i64>,
    /// One past the highest offset received; -1 before the first record.
    next: i64,
    /// The last offset committed by this member.
    committed: i64,
}

impl Part {
    /// The offset to commit: the lowest offset not yet done. Everything below it is
    /// processed, so out-of-order completion never commits past an unfinished message.
    fn watermark(&self) -> Option<i64> {
        if self.next < 0 {
            return None;
        }
        Some(self.pending.first().copied().unwrap_or(self.next))
    }
}

#[derive(Default)]
struct State {
    parts: HashMap<i32, Part>,
    next_epoch: u64,
    /// Deliverable now, in order: fresh records whose key is free, requeued ones, and
    /// successors released by their key's predecessor.
    ready: VecDeque<Entry>,
    /// Keys with a message in `ready` or in flight.
    busy: HashSet<Key>,
    /// Records waiting for their key, in offset order per key.
    blocked: HashMap<Key, VecDeque<Entry>>,
    blocked_len: usize,
    /// Payload bytes in `ready` and `blocked`.
    buffered_bytes: usize,
    /// Handed out and not settled, by (partition, offset).
    inflight: HashMap<(i32, i64), Entry>,
    /// A revocation is waiting for in-flight messages.
    revoking: bool,
    /// Close (or drop) was asked: hand out nothing more.
    stopping: bool,
    /// The first assignment arrived.
    assigned: bool,
    /// The member is gone (thread finished).
    finished: bool,
    /// A permanent consumer error to report from `recv_many`.
    error: Option<Error>,
    /// Why the poll thread ended without being asked to: every later `recv_many` fails
    /// with it, so a dead member is an error rather than a silent stall.
    died: Option<String>,
    /// Partitions this member held until its last revocation: getting them back needs
    /// no assign delay, since nobody else can have been reading them.
    owned_before: HashSet<i32>,
}

impl State {
    fn buffered(&self) -> usize {
        self.ready.len() + self.blocked_len
    }

    fn admit(&mut self, entry: Entry) {
        let Some(part) = self.parts.get_mut(&entry.partition) else {
            return; // a stale record of a partition no longer ours
        };
        if !part.pending.insert(entry.offset) {
            return; // already held (a re-fetch): one copy is enough
        }
        part.next = part.next.max(entry.offset + 1);
        self.buffered_bytes += entry.message.payload.len();
        match &entry.key {
            None => self.ready.push_back(entry),
            Some(k) if self.busy.contains(k) => {
                self.blocked.entry(k.clone()).or_default().push_back(entry);
                self.blocked_len += 1;
            }
            Some(k) => {
                self.busy.insert(k.clone());
                self.ready.push_back(entry);
            }
        }
    }

    /// The key's next waiting record becomes deliverable, or the key is free.
    fn release_key(&mut self, key: &Option<Key>) {
        let Some(key) = key else { return };
        if let Some(queue) = self.blocked.get_mut(key) {
            if let Some(next) = queue.pop_front() {
                self.blocked_len -= 1;
                if queue.is_empty() {
                    self.blocked.remove(key);
                }
                self.ready.push_back(next);
                return;
            }
        }
        self.busy.remove(key);
    }

    /// Drops undelivered records of these partitions (their offsets stay uncommitted,
    /// so the partition's next owner reads them) and rebuilds the key gate.
    fn purge(&mut self, gone: &HashSet<i32>) {
        self.ready.retain(|e| !gone.contains(&e.partition));
        for queue in self.blocked.values_mut() {
            queue.retain(|e| !gone.contains(&e.partition));
        }
        self.blocked.retain(|_, q| !q.is_empty());
        self.blocked_len = self.blocked.values().map(VecDeque::len).sum();
        self.buffered_bytes = self
            .ready
            .iter()
            .chain(self.blocked.values().flatten())
            .map(|e| e.message.payload.len())
            .sum();
        self.busy = self
            .inflight
            .values()
            .chain(self.ready.iter())
            .filter_map(|e| e.key.clone())
            .collect();
        // A key whose busy predecessor was purged: its first waiting record may go.
        let free: Vec<Key> = self
            .blocked
            .keys()
            .filter(|k| !self.busy.contains(*k))
            .cloned()
            .collect();
        for k in free {
            self.busy.insert(k.clone());
            self.release_key_into_ready(&k);
        }
    }

    fn release_key_into_ready(&mut self, key: &Key) {
        if let Some(queue) = self.blocked.get_mut(key) {
            if let Some(next) = queue.pop_front() {
                self.blocked_len -= 1;
                self.ready.push_back(next);
            }
            if queue.is_empty() {
                self.blocked.remove(key);
            }
        }
    }

    /// Offsets to commit: each partition's watermark where it moved past the last commit.
    fn to_commit(&self, topic: &str, only: Option<&HashSet<i32>>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, part) in &self.parts {
            if only.is_some_and(|o| !o.contains(p)) {
                continue;
            }
            if let Some(w) = part.watermark() {
                if w > part.committed {
                    let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(w));
                }
            }
        }
        tpl
    }

    fn mark_committed(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let (Some(part), Offset::Offset(o)) =
                (self.parts.get_mut(&e.partition()), e.offset())
            {
                part.committed = part.committed.max(o);
            }
        }
    }
}

/// State shared by the subscription, its poll thread and its ack handles.
pub(crate) struct Shared {
    topic: Arc<str>,
    group: Arc<str>,
    prefetch: usize,
    buffer_limit: usize,
    max_buffered_bytes: usize,
    commit: CommitStrategy,
    revoke_timeout: Duration,
    assign_delay: Duration,
    start: StartFrom,
    state: Mutex<State>,
    /// Wakes `recv_many`: something became deliverable, or the member stopped.
    wake: tokio::sync::Notify,
    /// Wakes a revocation waiting for in-flight messages.
    settled: Condvar,
    /// Wakes `subscribe` waiting for the first assignment.
    joined: tokio::sync::Notify,
    /// The consumer, for synchronous commits from ack handles; cleared when the
    /// member finishes so the consumer can close.
    consumer: Mutex<Option<Arc<BaseConsumer<MemberContext>>>>,
    /// Serialises synchronous commits, so an older watermark never lands after a newer one.
    sync_commit: tokio::sync::Mutex<()>,
    /// Counts rebalance callbacks, so the poll thread can drop records it polled under
    /// the previous assignment.
    rebalances: AtomicU64,
    /// librdkafka's side of back-pressure; only the poll thread uses it (rebalance
    /// callbacks run inside its `poll`), so the lock is never contended.
    fetching: Mutex<Fetching>,
}

/// What the poll thread told librdkafka about fetching.
#[derive(Default)]
struct Fetching {
    /// The member is back-pressured: every assigned partition must be paused.
    paused: bool,
    /// Partitions paused by us and not resumed since. librdkafka keeps this flag across
    /// unassign and assign, and resuming a partition that is not paused restarts its
    /// fetch from where it began (re-reading what was handed out), so we track it.
    app_paused: HashSet<i32>,
    /// Partitions assigned or revoked since the poll thread last looked: records it
    /// polled from them before that belong to the previous assignment.
    touched: HashSet<i32>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Commits the watermarks (of `only`, or all partitions) synchronously.
    fn commit_now(&self, consumer: &BaseConsumer<MemberContext>, only: Option<&HashSet<i32>>) {
        if self.commit == CommitStrategy::Auto {
            return;
        }
        let tpl = self.state().to_commit(&self.topic, only);
        if tpl.count() == 0 {
            return;
        }
        tracing::debug!(topic = %self.topic, group = %self.group, offsets = ?tpl, "committing");
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                tracing::debug!(topic = %self.topic, group = %self.group, "committed");
                self.state().mark_committed(&tpl)
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, group = %self.group, error = %e, "offset commit failed; it is retried with the next commit")
            }
        }
    }

    fn on_assign(&self, consumer: &BaseConsumer<MemberContext>, tpl: &mut TopicPartitionList) {
        let taken_over = {
            let st = self.state();
            !st.stopping
                && tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .any(|e| !st.owned_before.contains(&e.partition()))
        };
        let assigned = tpl.elements_for_topic(&self.topic).len();
        if taken_over && !self.assign_delay.is_zero() && !self.owns_whole_topic(consumer, assigned)
        {
            // Let a previous owner that has not noticed the rebalance yet commit and
            // let go before we read the committed offsets (see `assign_delay_ms`).
            std::thread::sleep(self.assign_delay);
        }
        if self.start == StartFrom::Latest {
            self.pin_latest(consumer, tpl);
        }
        let mut st = self.state();
        for e in tpl.elements_for_topic(&self.topic) {
            st.next_epoch += 1;
            let epoch = st.next_epoch;
            st.parts.insert(
                e.partition(),
                Part {
                    epoch,
                    pending: BTreeSet::new(),
                    next: -1,
                    committed: -1,
                },
            );
        }
        st.assigned = true;
        drop(st);
        tracing::debug!(topic = %self.topic, group = %self.group, partitions = tpl.count(), "partitions assigned");
        self.joined.notify_waiters();
    }

    /// Whether this member was given every partition of the topic: then the group's
    /// assignment saw no other member, so no previous owner is still reading (they
    /// left or were evicted) and the assign delay is pointless.
    fn owns_whole_topic(&self, consumer: &BaseConsumer<MemberContext>, assigned: usize) -> bool {
        match consumer.fetch_metadata(Some(&self.topic), META_TIMEOUT) {
            Ok(m) => m
                .topics()
                .iter()
                .find(|t| t.name() == &*self.topic)
                .is_some_and(|t| !t.partitions().is_empty() && t.partitions().len() <= assigned),
            Err(_) => false,
        }
    }

    /// A new group starting at "latest" reads from the end as it is *now*, before
    /// `subscribe` returns, and commits that position; librdkafka would resolve it
    /// later, and a message published in between would be skipped.
    fn pin_latest(&self, consumer: &BaseConsumer<MemberContext>, tpl: &mut TopicPartitionList) {
        let committed = match consumer.committed_offsets(tpl.clone(), META_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading committed offsets failed; starting at the end as librdkafka resolves it");
                return;
            }
        };
        let mut pinned = TopicPartitionList::new();
        for e in committed.elements_for_topic(&self.topic) {
            if matches!(e.offset(), Offset::Offset(_)) {
                continue; // the group has a position here already
            }
            match consumer.fetch_watermarks(&self.topic, e.partition(), META_TIMEOUT) {
                Ok((_, high)) => {
                    let _ =
                        tpl.set_partition_offset(&self.topic, e.partition(), Offset::Offset(high));
                    let _ = pinned.add_partition_offset(
                        &self.topic,
                        e.partition(),
                        Offset::Offset(high),
                    );
                }
                Err(e) => tracing::warn!(error = %e, "reading the end offset failed"),
            }
        }
        if pinned.count() > 0 {
            if let Err(e) = consumer.commit(&pinned, CommitMode::Sync) {
                tracing::warn!(error = %e, "committing the start position failed");
            }
        }
    }

    /// Stops handing out the revoked partitions' records, waits (bounded) for their
    /// in-flight messages, commits what finished, and forgets the partitions so later
    /// settles of their deliveries cannot commit.
    fn on_revoke(&self, consumer: &BaseConsumer<MemberContext>, tpl: &TopicPartitionList) {
        let gone: HashSet<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let deadline = Instant::now() + self.revoke_timeout;
        let mut st = self.state();
        st.purge(&gone);
        st.revoking = true;
        loop {
            let waiting = st.inflight.keys().filter(|(p, _)| gone.contains(p)).count();
            // On close the runtime has already waited for its handlers; what is left is
            // abandoned and goes to the next owner.
            if waiting == 0 || st.stopping {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(topic = %self.topic, group = %self.group, waiting, "in-flight messages of revoked partitions did not finish in time; they will be redelivered to the partitions' next owner");
                break;
            }
            st = self
                .settled
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.revoking = false;
        drop(st);
        self.commit_now(consumer, Some(&gone));
        let mut st = self.state();
        st.owned_before.clone_from(&gone);
        st.parts.retain(|p, _| !gone.contains(p));
        st.inflight.retain(|(p, _), _| !gone.contains(p));
        let removed = HashSet::new();
        st.purge(&removed); // keys of dropped in-flight entries are free again
        tracing::debug!(topic = %self.topic, group = %self.group, partitions = gone.len(), "partitions revoked");
    }

    /// Settles one delivery. `Err` when its partition is no longer this member's (it
    /// was revoked or the subscription closed): the next owner redelivers it.
    fn settle(&self, partition: i32, offset: i64, epoch: u64, nack: Option<Nack>) -> Result<()> {
        let mut st = self.state();
        let current = st.parts.get(&partition).is_some_and(|p| p.epoch == epoch);
        let entry = if current {
            st.inflight.remove(&(partition, offset))
        } else {
            None
        };
        let Some(mut entry) = entry else {
            return Err(Error::SubscriptionClosed {
                id: format!("{}:{partition}:{offset}", self.topic),
            });
        };
        match nack {
            Some(Nack::Requeue) if !st.stopping && !st.revoking => {
                // In-process redelivery: the offset stays pending (uncommitted) and the
                // key stays busy, so later same-key records keep waiting behind it.
                entry.attempt += 1;
                st.buffered_bytes += entry.message.payload.len();
                st.ready.push_back(entry);
            }
            Some(Nack::Requeue) => {
                // Closing or losing the partition: leave it uncommitted for the next owner.
                st.release_key(&entry.key);
            }
            other => {
                if other == Some(Nack::Reject) {
                    tracing::warn!(topic = %self.topic, group = %self.group, partition, offset, id = %entry.message.id, "message rejected; it is skipped (committed past)");
                }
                if let Some(part) = st.parts.get_mut(&partition) {
                    part.pending.remove(&offset);
                }
                st.release_key(&entry.key);
            }
        }
        let revoking = st.revoking;
        drop(st);
        if revoking {
            self.settled.notify_all();
        }
        self.wake.notify_waiters();
        Ok(())
    }

    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }

    fn tpl(&self, partitions: impl IntoIterator<Item = i32>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        tpl
    }

    /// Pauses or resumes fetching of these partitions; `false` if librdkafka refused.
    fn pause_resume(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        partitions: &[i32],
        pause: bool,
    ) -> bool {
        if partitions.is_empty() {
            return true;
        }
        let tpl = self.tpl(partitions.iter().copied());
        let r = if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(topic = %self.topic, group = %self.group, ?partitions, pause, error = %e, "pausing or resuming partitions failed; retrying");
                false
            }
        }
    }

    /// Rebalance callback, right after librdkafka took the new partitions: give them the
    /// member's back-pressure state. librdkafka would otherwise apply whatever pause flag
    /// it kept from an earlier assignment of the same partition.
    fn fetch_assigned(&self, consumer: &BaseConsumer<MemberContext>, partitions: &[i32]) {
        let mut f = lock(&self.fetching);
        f.touched.extend(partitions.iter().copied());
        // Nothing of them has been handed out yet, so resuming (which restarts a fetch
        // at its start position) re-reads nothing.
        if self.pause_resume(consumer, partitions, f.paused) {
            for p in partitions {
                if f.paused {
                    f.app_paused.insert(*p);
                } else {
                    f.app_paused.remove(p);
                }
            }
        }
    }

    /// Rebalance callback, before librdkafka lets these partitions go: clear our pause
    /// flag on them, so a later assignment of one of them starts fetching cleanly.
    fn fetch_revoked(&self, consumer: &BaseConsumer<MemberContext>, partitions: &[i32]) {
        let mut f = lock(&self.fetching);
        f.touched.extend(partitions.iter().copied());
        let paused: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| f.app_paused.contains(p))
            .collect();
        if self.pause_resume(consumer, &paused, false) {
            for p in &paused {
                f.app_paused.remove(p);
            }
        }
    }

    /// Back-pressure, from the poll loop: pause every assigned partition while the
    /// buffer is full (a slow handler or a stuck key), resume them once it drained to
    /// half. The member keeps polling while paused, so rebalances and heartbeats are
    /// served. Failed calls are retried on the next turn.
    fn apply_back_pressure(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        buffered: usize,
        bytes: usize,
    ) {
        let mut f = lock(&self.fetching);
        f.paused = if f.paused {
            buffered >= self.buffer_limit / 2 || bytes >= self.max_buffered_bytes / 2
        } else {
            buffered >= self.buffer_limit || bytes >= self.max_buffered_bytes
        };
        if f.paused {
            let Ok(assigned) = consumer.assignment() else {
                return;
            };
            let missing: Vec<i32> = self
                .partitions(&assigned)
                .into_iter()
                .filter(|p| !f.app_paused.contains(p))
                .collect();
            if self.pause_resume(consumer, &missing, true) {
                f.app_paused.extend(missing);
            }
        } else if !f.app_paused.is_empty() {
            // Only partitions we paused: resuming a running one restarts its fetch.
            let paused: Vec<i32> = f.app_paused.iter().copied().collect();
            if self.pause_resume(consumer, &paused, false) {
                f.app_paused.clear();
            }
        }
    }

    /// The partitions assigned or revoked since the last call.
    fn take_touched(&self) -> HashSet<i32> {
        std::mem::take(&mut lock(&self.fetching).touched)
    }

    /// `commit=sync`: commit the partition's watermark before the ack returns.
    async fn commit_sync(&self, partition: i32) -> Result<()> {
        let _serial = self.sync_commit.lock().await;
        let only: HashSet<i32> = [partition].into_iter().collect();
        let tpl = self.state().to_commit(&self.topic, Some(&only));
        let consumer = lock(&self.consumer).clone();
        let (Some(consumer), true) = (consumer, tpl.count() > 0) else {
            return Ok(());
        };
        let commit_tpl = tpl.clone();
        // A synchronous commit blocks on a broker round trip.
        let r = tokio::task::spawn_blocking(move || consumer.commit(&commit_tpl, CommitMode::Sync))
            .await
            .map_err(|e| Error::permanent(BACKEND, e.to_string()))?;
        match r {
            Ok(()) => {
                self.state().mark_committed(&tpl);
                Ok(())
            }
            Err(e) => Err(kafka_error(
                format!(
                    "committing offsets of {} for group {}",
                    self.topic, self.group
                ),
                e,
            )),
        }
    }
}

/// The librdkafka context of a member: routes rebalances to [`Shared`].
pub(crate) struct MemberContext {
    shared: Arc<Shared>,
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        // Before anything else, so the poll loop knows its earlier records are stale.
        self.shared.rebalances.fetch_add(1, Ordering::AcqRel);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Record the partitions before librdkafka starts fetching them.
                self.shared.on_assign(consumer, tpl);
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                match r {
                    Ok(()) => self
                        .shared
                        .fetch_assigned(consumer, &self.shared.partitions(tpl)),
                    Err(e) => tracing::error!(error = %e, "assigning partitions failed"),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.shared.on_revoke(consumer, tpl);
                self.shared
                    .fetch_revoked(consumer, &self.shared.partitions(tpl));
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "releasing partitions failed");
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(error = %code, "rebalance failed; releasing partitions");
                let all = consumer.assignment().unwrap_or_default();
                self.shared.on_revoke(consumer, &all);
                self.shared
                    .fetch_revoked(consumer, &self.shared.partitions(&all));
                let _ = consumer.unassign();
            }
        }
    }
}

/// One member of a consumer group on one topic.
pub(crate) struct KafkaSubscription {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    closed: bool,
}

impl KafkaSubscription {
    /// Creates the consumer, joins the group, and returns once the first assignment
    /// (possibly empty) arrived, so a `Latest` member sees everything published after.
    pub(crate) async fn start(config: &KafkaConfig, options: SubscribeOptions) -> Result<Self> {
        let earliest = !matches!(options.start, StartFrom::Latest);
        let client = config.consumer(&options.group, earliest);
        let shared = Arc::new(Shared {
            topic: options.topic.as_str().into(),
            group: options.group.as_str().into(),
            prefetch: options.prefetch,
            // Large enough that a fast consumer never pauses (a pause makes librdkafka
            // drop what it prefetched and fetch it again), small enough to bound memory
            // when handlers are slow or one key is stuck.
            buffer_limit: (options.prefetch * 8).max(50_000),
            max_buffered_bytes: client
                .get("queued.max.messages.kbytes")
                .and_then(|kb| kb.parse::<usize>().ok())
                .map_or(MAX_BUFFERED_BYTES, |kb| kb.saturating_mul(1024)),
            commit: config.commit,
            revoke_timeout: config.revoke_timeout,
            assign_delay: config.assign_delay,
            start: options.start,
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
            settled: Condvar::new(),
            joined: tokio::sync::Notify::new(),
            consumer: Mutex::new(None),
            sync_commit: tokio::sync::Mutex::new(()),
            rebalances: AtomicU64::new(0),
            fetching: Mutex::new(Fetching::default()),
        });
        let consumer: BaseConsumer<MemberContext> = client
            .create_with_context(MemberContext {
                shared: shared.clone(),
            })
            .map_err(|e| {
                Error::config(
                    "url",
                    format!(
                        "librdkafka rejected the consumer settings: {}",
                        crate::config::describe_client_error(&e)
                    ),
                )
            })?;
        consumer
            .subscribe(&[&options.topic])
            .map_err(|e| kafka_error(format!("subscribing to {}", options.topic), e))?;
        let consumer = Arc::new(consumer);
        *lock(&shared.consumer) = Some(consumer.clone());
        let commit_interval = config.commit_interval;
        let thread_shared = shared.clone();
        let thread = spawn_member(shared.clone(), move || {
            poll_loop(thread_shared, consumer, commit_interval)
        })
        .map_err(|e| Error::permanent(BACKEND, format!("starting the consumer thread: {e}")))?;
        let mut sub = Self {
            shared,
            thread: Some(thread),
            closed: false,
        };
        let waited = tokio::time::timeout(config.join_timeout, async {
            loop {
                let joined = sub.shared.joined.notified();
                tokio::pin!(joined);
                joined.as_mut().enable();
                let done = {
                    let st = sub.shared.state();
                    st.assigned || st.finished
                };
                if done {
                    return;
                }
                joined.await;
            }
        })
        .await;
        let died = sub.shared.state().died.clone();
        if let Some(why) = died {
            sub.closed = true;
            return Err(Error::permanent(BACKEND, why));
        }
        if waited.is_err() {
            sub.stop();
            sub.closed = true;
            return Err(Error::Timeout {
                after: config.join_timeout,
                what: format!(
                    "group {:?} on topic {:?} to assign partitions, from the Kafka broker(s) at {} (is it reachable?)",
                    options.group, options.topic, config.bootstrap_servers
                ),
            });
        }
        Ok(sub)
    }

    fn stop(&self) {
        self.shared.state().stopping = true;
        self.shared.settled.notify_all();
        self.shared.wake.notify_waiters();
    }

    fn delivery(&self, entry: Entry) -> Delivery {
        let origin = Origin::new(
            self.shared.topic.clone(),
            self.shared.group.clone(),
            Some(entry.partition),
            Some(entry.offset),
        );
        let acker = KafkaAcker {
            shared: self.shared.clone(),
            partition: entry.partition,
            offset: entry.offset,
            epoch: entry.epoch,
        };
        Delivery::new(entry.message, entry.attempt, origin, acker)
    }
}

/// Runs the member's poll loop on its own thread. However the loop ends, the member is
/// marked finished and `recv_many` woken; if it ends without being asked to (a panic),
/// `recv_many` fails from then on instead of waiting forever.
fn spawn_member(
    shared: Arc<Shared>,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("sy-kafka-{}", shared.topic))
        .spawn(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(body));
            let why = match &outcome {
                Ok(()) => None,
                Err(panic) => Some(
                    panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into()),
                ),
            };
            shared.member_ended(why);
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        })
}

impl Shared {
    fn member_ended(&self, panicked: Option<String>) {
        let mut st = self.state();
        let died = match panicked {
            Some(why) => Some(format!("the consumer thread panicked: {why}")),
            None if !st.stopping => Some("the consumer thread ended unexpectedly".to_string()),
            None => None,
        };
        if let Some(why) = died {
            tracing::error!(topic = %self.topic, group = %self.group, %why, "consumer member died");
            st.died = Some(format!(
                "consuming {} in group {}: {why}",
                self.topic, self.group
            ));
        }
        // Forget everything before the consumer closes: a revocation it runs then must
        // neither wait nor commit from state the panic may have left half-updated.
        st.stopping = true;
        st.finished = true;
        st.parts.clear();
        st.inflight.clear();
        st.ready.clear();
        st.blocked.clear();
        st.blocked_len = 0;
        st.buffered_bytes = 0;
        drop(st);
        lock(&self.consumer).take();
        self.settled.notify_all();
        self.wake.notify_waiters();
        self.joined.notify_waiters();
    }
}

fn poll_loop(shared: Arc<Shared>, consumer: Arc<BaseConsumer<MemberContext>>, interval: Duration) {
    let mut batch: Vec<Entry> = Vec::with_capacity(POLL_BATCH);
    let mut next_commit = Instant::now() + interval;
    loop {
        let (stopping, buffered, bytes) = {
            let st = shared.state();
            (st.stopping, st.buffered(), st.buffered_bytes)
        };
        if stopping {
            break;
        }
        shared.apply_back_pressure(&consumer, buffered, bytes);
        let mut wait = POLL_WAIT;
        while batch.len() < POLL_BATCH {
            let before = shared.rebalances.load(Ordering::Acquire);
            let polled = consumer.poll(wait);
            if shared.rebalances.load(Ordering::Acquire) != before {
                // A rebalance ran inside this poll: what we polled earlier from the
                // partitions it moved belongs to the old assignment, and will be fetched
                // again from the committed offset if the partition comes back.
                let touched = shared.take_touched();
                batch.retain(|e| !touched.contains(&e.partition));
            }
            match polled {
                None => break,
                Some(Ok(m)) => {
                    let message = record::to_message(&m);
                    batch.push(Entry {
                        partition: rdkafka::Message::partition(&m),
                        offset: rdkafka::Message::offset(&m),
                        epoch: 0,
                        key: message.key.as_deref().map(Key::from),
                        message: Arc::new(message),
                        attempt: 1,
                    });
                }
                Some(Err(e)) => {
                    on_poll_error(&shared, e);
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        if !batch.is_empty() {
            let mut st = shared.state();
            for mut e in batch.drain(..) {
                if let Some(p) = st.parts.get(&e.partition) {
                    e.epoch = p.epoch;
                    st.admit(e);
                }
            }
            drop(st);
            shared.wake.notify_waiters();
        }
        if shared.commit == CommitStrategy::Periodic && Instant::now() >= next_commit {
            shared.commit_now(&consumer, None);
            next_commit = Instant::now() + interval;
        }
    }
    // Leaving: commit what finished, then close the consumer, which revokes (without
    // waiting, since we are stopping) and leaves the group so others take over now.
    shared.commit_now(&consumer, None);
    lock(&shared.consumer).take();
    consumer.unsubscribe();
    drop(consumer);
}

fn on_poll_error(shared: &Shared, e: KafkaError) {
    let code = e.rdkafka_error_code();
    let fatal = matches!(
        code,
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
        )
    );
    if fatal {
        tracing::error!(topic = %shared.topic, group = %shared.group, error = %e, "consumer failed");
        shared.state().error = Some(kafka_error(
            format!("consuming {} in group {}", shared.topic, shared.group),
            e,
        ));
        shared.wake.notify_waiters();
    } else {
        // Broker restarts and the like: librdkafka reconnects by itself.
        tracing::warn!(topic = %shared.topic, group = %shared.group, error = %e, "consumer error; retrying");
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn recv_many(&mut self, buf: &mut Vec<Delivery>, max: usize) -> Result<usize> {
        if self.closed {
            return Ok(0);
        }
        loop {
            let wake = self.shared.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            // Everything below happens under the lock with no await, so a cancelled
            // call takes nothing: cancel-safe.
            let taken: Vec<Entry> = {
                let mut st = self.shared.state();
                if let Some(e) = st.error.take() {
                    return Err(e);
                }
                if let Some(why) = &st.died {
                    return Err(Error::permanent(BACKEND, why.clone()));
                }
                if st.stopping || st.finished {
                    return Ok(0);
                }
                let credit = self.shared.prefetch.saturating_sub(st.inflight.len());
                let n = max.min(credit).min(st.ready.len());
                let mut taken = Vec::with_capacity(n);
                for _ in 0..n {
                    let Some(e) = st.ready.pop_front() else { break };
                    st.buffered_bytes = st.buffered_bytes.saturating_sub(e.message.payload.len());
                    let key = (e.partition, e.offset);
                    st.inflight.insert(
                        key,
                        Entry {
                            partition: e.partition,
                            offset: e.offset,
                            epoch: e.epoch,
                            message: e.message.clone(),
                            attempt: e.attempt,
                            key: e.key.clone(),
                        },
                    );
                    taken.push(e);
                }
                taken
            };
            if !taken.is_empty() {
                let n = taken.len();
                buf.extend(taken.into_iter().map(|e| self.delivery(e)));
                return Ok(n);
            }
            wake.await;
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.closed = true;
        self.stop();
        if let Some(thread) = self.thread.take() {
            // Joining waits for the final commit and the group leave (network calls).
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
                .map_err(|_| Error::permanent(BACKEND, "the consumer thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        if !self.closed {
            // Dropped without close: the thread commits what finished and leaves the
            // group in the background; unsettled messages go to the other members.
            self.stop();
        }
    }
}

struct KafkaAcker {
    shared: Arc<Shared>,
    partition: i32,
    offset: i64,
    epoch: u64,
}

impl Acker for KafkaAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.shared
                .settle(self.partition, self.offset, self.epoch, None)?;
            if self.shared.commit == CommitStrategy::Sync {
                self.shared.commit_sync(self.partition).await?;
            }
            Ok(())
        })
    }

    fn nack(&self, action: Nack) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.shared
                .settle(self.partition, self.offset, self.epoch, Some(action))?;
            if action == Nack::Reject && self.shared.commit == CommitStrategy::Sync {
                self.shared.commit_sync(self.partition).await?;
            }
            Ok(())
        })
    }

    fn dropped_unsettled(&self) {
        // A forgotten delivery is redelivered rather than lost.
        let _ = self
            .shared
            .settle(self.partition, self.offset, self.epoch, Some(Nack::Requeue));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            topic: "t".into(),
            group: "g".into(),
            prefetch: 8,
            buffer_limit: 50_000,
            max_buffered_bytes: MAX_BUFFERED_BYTES,
            commit: CommitStrategy::Periodic,
            revoke_timeout: Duration::from_secs(1),
            assign_delay: Duration::ZERO,
            start: StartFrom::Earliest,
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
            settled: Condvar::new(),
            joined: tokio::sync::Notify::new(),
            consumer: Mutex::new(None),
            sync_commit: tokio::sync::Mutex::new(()),
            rebalances: AtomicU64::new(0),
            fetching: Mutex::new(Fetching::default()),
        })
    }

    /// The subscription of a member whose poll thread runs `body`.
    fn member(shared: Arc<Shared>, body: impl FnOnce() + Send + 'static) -> KafkaSubscription {
        let thread = spawn_member(shared.clone(), body).unwrap();
        KafkaSubscription {
            shared,
            thread: Some(thread),
            closed: false,
        }
    }

    async fn recv_error(sub: &mut KafkaSubscription) -> Error {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), sub.recv_many(&mut buf, 10))
            .await
            .expect("recv_many noticed the poll thread is gone")
            .expect_err("recv_many fails once the poll thread is gone")
    }

    #[tokio::test]
    async fn a_poll_thread_that_panics_makes_recv_fail_for_good() {
        let mut sub = member(shared(), || panic!("record decoding blew up"));
        for _ in 0..2 {
            let err = recv_error(&mut sub).await;
            assert!(!err.is_transient(), "{err}");
            assert!(err.to_string().contains("record decoding blew up"), "{err}");
        }
        let closed = Box::new(sub).close().await;
        assert!(closed.is_err(), "close reports the panic too: {closed:?}");
    }

    #[tokio::test]
    async fn a_poll_thread_that_returns_unasked_makes_recv_fail() {
        let mut sub = member(shared(), || ());
        let err = recv_error(&mut sub).await;
        assert!(!err.is_transient(), "{err}");
        assert!(err.to_string().contains("ended unexpectedly"), "{err}");
    }

    #[tokio::test]
    async fn a_poll_thread_that_stops_when_asked_ends_recv_quietly() {
        let shared = shared();
        let asked = shared.clone();
        let mut sub = member(shared, move || {
            while !asked.state().stopping {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        sub.stop();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), sub.recv_many(&mut buf, 10))
            .await
            .expect("recv_many returns");
        assert_eq!(n.unwrap(), 0);
        Box::new(sub).close().await.unwrap();
    }
}
