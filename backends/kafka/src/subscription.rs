//! One group member as a [`Subscription`]: the state its poll thread, ack handles and
//! `recv_many` share, and handing records out as deliveries.
//!
//! Why a thread and not a tokio task: librdkafka runs rebalance callbacks inside
//! `poll`, and on revocation we wait (bounded) for in-flight messages to finish. That
//! wait must not block a runtime worker, or the handlers it waits for could starve.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Condvar, Mutex, MutexGuard};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use switchyard_core::{Delivery, Error, Origin, Result, StartFrom, SubscribeOptions, Subscription};

use crate::acker::KafkaAcker;
use crate::broker::{config_error, kafka_error, BACKEND};
use crate::config::{CommitStrategy, KafkaConfig};
use crate::context::BrokerErrors;
use crate::fetching::Fetching;
use crate::poll::{poll_loop, spawn_member};
use crate::rebalance::MemberContext;
use crate::state::{Entry, State};

/// Payload bytes a member buffers (received, not yet handed out) before it pauses
/// fetching, unless `queued.max.messages.kbytes` (librdkafka's bound on its own prefetch
/// queue, 64 MiB by default too) says otherwise.
const MAX_BUFFERED_BYTES: usize = 64 << 20;

/// State shared by the subscription, its poll thread and its ack handles.
pub(crate) struct Shared {
    /// The member's settings, from the subscribe options and the config.
    pub(crate) topic: Arc<str>,
    pub(crate) group: Arc<str>,
    pub(crate) prefetch: usize,
    pub(crate) buffer_limit: usize,
    pub(crate) max_buffered_bytes: usize,
    pub(crate) commit: CommitStrategy,
    pub(crate) revoke_timeout: Duration,
    pub(crate) assign_delay: Duration,
    pub(crate) start: StartFrom,
    pub(crate) state: Mutex<State>,
    /// Wakes `recv_many`: something became deliverable, or the member stopped.
    pub(crate) wake: tokio::sync::Notify,
    /// Wakes a revocation waiting for in-flight messages.
    pub(crate) settled: Condvar,
    /// Wakes `subscribe` waiting for the first assignment.
    pub(crate) joined: tokio::sync::Notify,
    /// The consumer, for synchronous commits from ack handles; cleared when the
    /// member finishes so the consumer can close.
    pub(crate) consumer: Mutex<Option<Arc<BaseConsumer<MemberContext>>>>,
    /// Serialises synchronous commits, so an older watermark never lands after a newer one.
    pub(crate) sync_commit: tokio::sync::Mutex<()>,
    /// Counts rebalance callbacks, so the poll thread can drop records it polled under
    /// the previous assignment.
    pub(crate) rebalances: AtomicU64,
    /// librdkafka's side of back-pressure; only the poll thread uses it (rebalance
    /// callbacks run inside its `poll`), so the lock is never contended.
    pub(crate) fetching: Mutex<Fetching>,
}

impl Shared {
    /// A member of `options.group`, not joined yet, whose consumer has the settings
    /// `client`.
    pub(crate) fn new(
        config: &KafkaConfig,
        options: &SubscribeOptions,
        client: &ClientConfig,
    ) -> Self {
        let max_buffered_bytes = client
            .get("queued.max.messages.kbytes")
            .and_then(|kb| kb.parse::<usize>().ok())
            .map_or(MAX_BUFFERED_BYTES, |kb| kb.saturating_mul(1024));
        Self {
            topic: options.topic.as_str().into(),
            group: options.group.as_str().into(),
            prefetch: options.prefetch,
            // Large enough that a fast consumer never pauses (a pause makes librdkafka
            // drop what it prefetched and fetch it again), small enough to bound memory
            // when handlers are slow or one key is stuck.
            buffer_limit: (options.prefetch * 8).max(50_000),
            max_buffered_bytes,
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
        }
    }

    /// The member's state, locked.
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// These (partition, offset) pairs of the topic, as librdkafka takes them.
    pub(crate) fn offsets(&self, offsets: &[(i32, i64)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            // Fails only for an offset librdkafka cannot name; ours never are.
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o));
        }
        tpl
    }

    /// Commits the watermarks (of `only`, or all partitions): a blocking round trip.
    pub(crate) fn commit(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        only: Option<&HashSet<i32>>,
    ) -> Result<()> {
        if self.commit == CommitStrategy::Auto {
            return Ok(());
        }
        let offsets = self.state().to_commit(only);
        if offsets.is_empty() {
            return Ok(());
        }
        tracing::debug!(topic = %self.topic, group = %self.group, ?offsets, "committing");
        consumer
            .commit(&self.offsets(&offsets), CommitMode::Sync)
            .map_err(|e| {
                let what = format!(
                    "committing offsets of {} for group {}",
                    self.topic, self.group
                );
                kafka_error(what, e)
            })?;
        self.state().mark_committed(&offsets);
        Ok(())
    }

    /// [`commit`](Self::commit) from the poll thread, where a failure only waits for
    /// the next commit.
    pub(crate) fn commit_now(
        &self,
        consumer: &BaseConsumer<MemberContext>,
        only: Option<&HashSet<i32>>,
    ) {
        if let Err(e) = self.commit(consumer, only) {
            tracing::warn!(error = %e, "offset commit failed; it is retried with the next commit");
        }
    }
}

/// One member of a consumer group on one topic.
pub(crate) struct KafkaSubscription {
    pub(crate) shared: Arc<Shared>,
    /// The poll thread, joined by `close`.
    pub(crate) thread: Option<JoinHandle<()>>,
    /// `close` ran (or `start` gave up): dropping need not stop the member again.
    pub(crate) closed: bool,
}

impl KafkaSubscription {
    /// Creates the consumer, joins the group, and returns once the first assignment
    /// (possibly empty) arrived, so a `Latest` member sees everything published after.
    pub(crate) async fn start(config: &KafkaConfig, options: SubscribeOptions) -> Result<Self> {
        let config = &config.for_guarantee(options.guarantee)?;
        let earliest = !matches!(options.start, StartFrom::Latest);
        let client = config.consumer(&options.group, earliest);
        let shared = Arc::new(Shared::new(config, &options, &client));
        let errors = BrokerErrors::new(&client);
        let consumer: BaseConsumer<MemberContext> = client
            .create_with_context(MemberContext {
                shared: shared.clone(),
                errors: errors.clone(),
            })
            .map_err(|e| config_error("consumer", e))?;
        consumer
            .subscribe(&[&options.topic])
            .map_err(|e| kafka_error(format!("subscribing to {}", options.topic), e))?;
        let consumer = Arc::new(consumer);
        *shared.consumer.lock() = Some(consumer.clone());
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
            return Err(errors.timed_out(
                config.join_timeout,
                format!(
                    "group {:?} on topic {:?} to assign partitions, from the Kafka broker(s) at {}",
                    options.group, options.topic, config.bootstrap_servers
                ),
            ));
        }
        Ok(sub)
    }

    /// Asks the member to stop: nothing more is handed out, a revocation waits no
    /// more, and the poll thread commits, leaves the group and ends.
    pub(crate) fn stop(&self) {
        self.shared.state().stopping = true;
        self.shared.settled.notify_all();
        self.shared.wake.notify_waiters();
    }

    /// A handed-out record as a delivery whose ack handle settles it here.
    pub(crate) fn delivery(&self, entry: Entry) -> Delivery {
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
                st.take(max, self.shared.prefetch)
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
