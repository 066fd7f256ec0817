//! A member of a group: its own connection, the partitions it owns, the key gate, and a
//! supervisor task that rebalances partitions and reconnects after a connection loss.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use switchyard_core::{
    Acker, CancellationToken, Delivery, Error, Message, Nack, Origin, Result, SubscribeOptions,
    Subscription,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::codec::decode;
use crate::config::RabbitConfig;
use crate::connection::connect_once;
use crate::gate::{Entry, Gate};
use crate::topology::{declare_group, map_err, soft_code, GroupNames};

/// How long a delivery may stay unsettled before the member warns that RabbitMQ's
/// consumer ack timeout (30 min by default) is near.
const ACK_TIMEOUT_WARNING: Duration = Duration::from_secs(25 * 60);

/// How long a partition being handed over may wait for a requeued message to come back
/// and be handled before it is released anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes receivers: something arrived or was settled.
    wake: Notify,
    /// Wakes the supervisor: a partition died or finished draining.
    supervisor: Notify,
    pub(crate) stop: CancellationToken,
    topic: Arc<str>,
    group: Arc<str>,
    prefetch: usize,
}

#[derive(Default)]
struct State {
    closed: bool,
    parts: BTreeMap<u32, Part>,
    /// Deliveries handed out and not settled, across partitions and reconnections.
    unsettled: usize,
    cursor: usize,
    fatal: Option<Error>,
    next_gen: u64,
    /// When each unsettled delivery was handed out, by hand-out number: the oldest is
    /// checked against RabbitMQ's consumer ack timeout.
    handed_out: BTreeMap<u64, Instant>,
    next_hand_out: u64,
    /// The newest hand-out number already warned about.
    warned_upto: u64,
}

struct Part {
    /// Tells this ownership from an earlier one of the same partition, so a stale
    /// delivery never settles into the new one's accounting.
    gen: u64,
    channel: Channel,
    /// The channel's prefetch limit (`basic.qos`, global) as last applied.
    qos: u16,
    gate: Gate,
    in_flight: usize,
    draining: Option<Instant>,
    /// Set by the pump when the consumer ended (channel closed, connection lost).
    lost: Option<String>,
    pump: Option<JoinHandle<()>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in another holder (no multi-step
        // invariants are left half-done), so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Joins `options.group` as one more member.
pub(crate) async fn subscribe(
    config: Arc<RabbitConfig>,
    options: SubscribeOptions,
    stop: CancellationToken,
) -> Result<(Box<dyn Subscription>, Arc<Shared>)> {
    options.validate()?;
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Notify::new(),
        supervisor: Notify::new(),
        stop,
        topic: options.topic.as_str().into(),
        group: options.group.as_str().into(),
        prefetch: options.prefetch,
    });
    let names = GroupNames::new(&options.topic, &options.group);
    let seed = (crate::topology::key_hash(&switchyard_core::new_id()) % 1024) as u32;
    let mut sup = Supervisor {
        shared: shared.clone(),
        config,
        names,
        conn: None,
        control: None,
        membership: None,
        seed,
        expires: options.ephemeral.then_some(options.ephemeral_expiry),
    };
    // The first connection and declarations happen here, so a refused declaration is
    // the caller's error and the group exists once subscribe returns.
    sup.connect().await?;
    if let Err(e) = sup.rebalance().await {
        tracing::warn!(error = %e, "first partition claim failed; the supervisor retries");
    }
    let task = tokio::spawn(sup.run());
    let sub = RabbitSubscription {
        shared: shared.clone(),
        task: Some(task),
    };
    Ok((Box::new(sub), shared))
}

struct RabbitSubscription {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl RabbitSubscription {
    fn deliver(&self, p: u32, gen: u64, seq: u64, entry: Entry) -> Delivery {
        let origin = Origin::new(
            self.shared.topic.clone(),
            self.shared.group.clone(),
            Some(p as i32),
            None,
        );
        let acker = RabbitAcker {
            shared: self.shared.clone(),
            part: p,
            gen,
            message: entry.message.clone(),
            attempt: entry.attempt,
            inner: entry.acker,
            done: AtomicBool::new(false),
            seq,
        };
        Delivery::new(entry.message, entry.attempt, origin, acker)
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn recv_many(&mut self, buf: &mut Vec<Delivery>, max: usize) -> Result<usize> {
        loop {
            let notified = self.shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut taken = Vec::new();
            {
                let mut guard = self.shared.lock();
                let st = &mut *guard;
                if st.closed {
                    return Ok(0);
                }
                if let Some(e) = st.fatal.take() {
                    return Err(e);
                }
                let credit = self.shared.prefetch.saturating_sub(st.unsettled).min(max);
                let keys: Vec<u32> = st.parts.keys().copied().collect();
                if credit > 0 && !keys.is_empty() {
                    // Round-robin over partitions so one busy partition does not starve
                    // the others.
                    let start = st.cursor % keys.len();
                    st.cursor = st.cursor.wrapping_add(1);
                    loop {
                        let mut progress = false;
                        for i in 0..keys.len() {
                            if taken.len() == credit {
                                break;
                            }
                            let p = keys[(start + i) % keys.len()];
                            let part = st.parts.get_mut(&p).expect("key listed above");
                            if part.lost.is_some() {
                                continue;
                            }
                            if let Some(entry) = part.gate.take(part.draining.is_some()) {
                                part.in_flight += 1;
                                st.next_hand_out += 1;
                                let seq = st.next_hand_out;
                                st.handed_out.insert(seq, Instant::now());
                                taken.push((p, part.gen, seq, entry));
                                progress = true;
                            }
                        }
                        if !progress || taken.len() == credit {
                            break;
                        }
                    }
                    st.unsettled += taken.len();
                }
            }
            if !taken.is_empty() {
                let n = taken.len();
                buf.extend(
                    taken
                        .into_iter()
                        .map(|(p, g, seq, e)| self.deliver(p, g, seq, e)),
                );
                return Ok(n);
            }
            notified.await;
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.shared.lock().closed = true;
        self.shared.wake.notify_waiters();
        self.shared.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        Ok(())
    }
}

impl Drop for RabbitSubscription {
    fn drop(&mut self) {
        if self.task.is_some() {
            // Dropped without close: the supervisor still closes the connection in the
            // background, which hands unsettled messages back to the broker.
            self.shared.lock().closed = true;
            self.shared.stop.cancel();
        }
    }
}

enum Settle {
    Done,
    Requeue,
}

struct RabbitAcker {
    shared: Arc<Shared>,
    part: u32,
    gen: u64,
    message: Arc<Message>,
    attempt: u32,
    inner: lapin::Acker,
    done: AtomicBool,
    /// Hand-out number, for the ack-timeout watch.
    seq: u64,
}

impl RabbitAcker {
    /// Local bookkeeping, done before the broker hears of it: a requeued message must be
    /// expected by the gate before its redelivery can arrive.
    fn account(&self, how: Settle) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut wake_supervisor = false;
        {
            let mut st = self.shared.lock();
            st.unsettled = st.unsettled.saturating_sub(1);
            st.handed_out.remove(&self.seq);
            if let Some(part) = st.parts.get_mut(&self.part) {
                if part.gen == self.gen {
                    part.in_flight = part.in_flight.saturating_sub(1);
                    part.gate
                        .settled(&self.message, self.attempt, matches!(how, Settle::Requeue));
                    wake_supervisor = part.draining.is_some() && part.in_flight == 0;
                }
            }
        }
        self.shared.wake.notify_waiters();
        if wake_supervisor {
            self.shared.supervisor.notify_one();
        }
    }

    fn closed(&self, detail: Option<lapin::Error>) -> Error {
        if let Some(e) = detail {
            tracing::debug!(id = %self.message.id, error = %e, "settling failed");
        }
        Error::SubscriptionClosed {
            id: self.message.id.clone(),
        }
    }

    fn outcome(&self, r: Result<lapin::Result<bool>, tokio::time::error::Elapsed>) -> Result<()> {
        match r {
            Ok(Ok(true)) => Ok(()),
            // The channel it came on is gone: the broker redelivers the message.
            Ok(Ok(false)) => Err(self.closed(None)),
            Ok(Err(e)) => Err(self.closed(Some(e))),
            Err(_) => Err(self.closed(None)),
        }
    }

    /// Whether the partition this delivery came from is still owned through the same
    /// channel. If not, lapin may never answer a settle on the dead channel, and the
    /// broker has already taken the message back.
    fn alive(&self) -> bool {
        let st = self.shared.lock();
        !st.closed
            && st
                .parts
                .get(&self.part)
                .is_some_and(|p| p.gen == self.gen && p.lost.is_none())
    }
}

/// A safety net around one settle call: a connection that dies mid-call must not hang
/// the caller.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

impl Acker for RabbitAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.alive() {
                self.account(Settle::Done);
                return Err(self.closed(None));
            }
            // Broker first, bookkeeping after: a partition being handed over closes its
            // channel once nothing is in flight, and the ack must be out before that or
            // the message would be requeued and handled twice.
            let r =
                tokio::time::timeout(SETTLE_TIMEOUT, self.inner.ack(BasicAckOptions::default()))
                    .await;
            self.account(Settle::Done);
            self.outcome(r)
        })
    }

    fn nack(&self, action: Nack) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.alive() {
                self.account(Settle::Done);
                return Err(self.closed(None));
            }
            match action {
                Nack::Requeue => {
                    // Bookkeeping first: the gate must expect the redelivery before it
                    // can arrive. A channel closed meanwhile requeues it just the same.
                    self.account(Settle::Requeue);
                    let r = tokio::time::timeout(
                        SETTLE_TIMEOUT,
                        self.inner.nack(BasicNackOptions {
                            requeue: true,
                            multiple: false,
                        }),
                    )
                    .await;
                    self.outcome(r)
                }
                _ => {
                    // Dead-lettered when the queue has a dead-letter exchange.
                    let r = tokio::time::timeout(
                        SETTLE_TIMEOUT,
                        self.inner.reject(BasicRejectOptions { requeue: false }),
                    )
                    .await;
                    self.account(Settle::Done);
                    self.outcome(r)
                }
            }
        })
    }

    fn dropped_unsettled(&self) {
        if self.done.load(Ordering::Acquire) {
            return;
        }
        let alive = self.alive();
        self.account(Settle::Requeue);
        if !alive {
            return;
        }
        let inner = self.inner.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = inner
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await;
            });
        }
    }
}

/// Owns the member's connection; claims, drains and releases partitions.
struct Supervisor {
    shared: Arc<Shared>,
    config: Arc<RabbitConfig>,
    names: GroupNames,
    conn: Option<Connection>,
    /// Membership consumer, member and partition-consumer counting.
    control: Option<Channel>,
    membership: Option<Consumer>,
    /// Where this member starts looking for free partitions, so members do not all
    /// race for partition 0.
    seed: u32,
    /// The `x-expires` of an ephemeral group's queues.
    expires: Option<Duration>,
}

impl Supervisor {
    fn healthy(&self) -> bool {
        match (&self.conn, &self.control) {
            (Some(c), Some(ch)) => c.status().connected() && ch.status().connected(),
            _ => false,
        }
    }

    async fn connect(&mut self) -> Result<()> {
        let role = format!("{} {}", self.shared.topic, self.shared.group);
        let conn = connect_once(&self.config, &role).await?;
        let setup = async {
            declare_group(
                &conn,
                &self.names,
                self.config.partitions,
                self.config.dead_letter_exchange.as_deref(),
                self.expires,
            )
            .await?;
            let control = conn
                .create_channel()
                .await
                .map_err(|e| map_err("opening a channel", e))?;
            // Being a consumer of the membership queue is what makes this member count.
            let membership = control
                .basic_consume(
                    self.names.members().into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| map_err("joining the group", e))?;
            Ok::<_, Error>((control, membership))
        }
        .await;
        match setup {
            Ok((control, membership)) => {
                self.conn = Some(conn);
                self.control = Some(control);
                self.membership = Some(membership);
                Ok(())
            }
            Err(e) => {
                let _ = conn.close(200, "setup failed".into()).await;
                Err(e)
            }
        }
    }

    /// Forgets every partition (their channels died with the connection; their
    /// messages go back to the queues) and the connection itself.
    async fn drop_connection(&mut self) {
        // The connection may still be up (only the control channel failed).
        self.close_parts().await;
        self.membership = None;
        self.control = None;
        if let Some(conn) = self.conn.take() {
            let _ = conn.close(200, "reconnecting".into()).await;
        }
    }

    async fn run(mut self) {
        let _ended = SupervisorEnded(self.shared.clone());
        let mut backoff = Duration::from_millis(100);
        let stop = self.shared.stop.clone();
        loop {
            if stop.is_cancelled() {
                break;
            }
            if !self.healthy() {
                self.drop_connection().await;
                tracing::warn!(
                    topic = %self.shared.topic,
                    group = %self.shared.group,
                    "connection lost; reconnecting"
                );
                match self.connect().await {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        tracing::info!(topic = %self.shared.topic, group = %self.shared.group, "reconnected");
                    }
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, ?backoff, "reconnect failed; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot rejoin the group");
                        self.shared.lock().fatal = Some(e);
                        self.shared.wake.notify_waiters();
                        break;
                    }
                }
            }
            if let Err(e) = self.rebalance().await {
                tracing::debug!(error = %e, "rebalance step failed");
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.config.rebalance_interval) => {}
                _ = self.shared.supervisor.notified() => {}
            }
        }
        self.shutdown().await;
    }

    /// Leaves the group: closes every partition channel, then the connection.
    async fn shutdown(&mut self) {
        self.close_parts().await;
        if let Some(conn) = self.conn.take() {
            let _ = conn.close(200, "subscription closed".into()).await;
        }
        self.shared.wake.notify_waiters();
    }

    /// Lets go of every partition: closes its channel, which hands its unsettled
    /// messages back to the queue and ends its consumer in one step, then stops its
    /// pump. Not basic.cancel first, nor a dropped lapin `Consumer` (which sends one): a
    /// cancelled consumer frees the queue for another member before this channel's
    /// unacked messages are back, and that member would get later messages first.
    async fn close_parts(&mut self) {
        let parts = std::mem::take(&mut self.shared.lock().parts);
        futures::future::join_all(parts.values().map(|part| async move {
            if part.channel.status().connected() {
                let _ = part.channel.close(200, "partition released".into()).await;
            }
        }))
        .await;
        for (_, part) in parts {
            if let Some(pump) = part.pump {
                pump.abort();
            }
        }
    }

    /// One step: drop dead partitions, finish hand-overs, then claim or give up
    /// partitions so this member holds its fair share (`ceil(partitions / members)`).
    async fn rebalance(&mut self) -> Result<()> {
        let Some(control) = self.control.clone() else {
            return Ok(());
        };
        // Partitions to let go of now: lost ones, and drained ones.
        let released: Vec<(u32, Part)> = {
            let mut st = self.shared.lock();
            let done: Vec<u32> = st
                .parts
                .iter()
                .filter(|(_, p)| {
                    p.lost.is_some()
                        || p.draining.is_some_and(|since| {
                            (p.in_flight == 0 && p.gate.quiet()) || since.elapsed() > DRAIN_LIMIT
                        })
                })
                .map(|(n, _)| *n)
                .collect();
            done.into_iter()
                .filter_map(|n| st.parts.remove(&n).map(|p| (n, p)))
                .collect()
        };
        for (n, part) in released {
            if let Some(why) = &part.lost {
                // RabbitMQ says "delivery acknowledgement on channel N timed out".
                if why.contains("acknowledgement") && why.contains("timed out") {
                    tracing::error!(
                        partition = n,
                        "RabbitMQ closed the channel because a delivery stayed unacked past its \
                         consumer_timeout (30 min by default); its messages are redelivered. \
                         Raise consumer_timeout in rabbitmq.conf or shorten the handler"
                    );
                } else {
                    tracing::warn!(partition = n, reason = %why, "partition consumer ended");
                }
            }
            self.release(part).await;
        }
        self.watch_ack_timeout();
        let members = control
            .queue_declare(
                self.names.members().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err("counting group members", e))?
            .consumer_count()
            .max(1);
        let total = self.config.partitions;
        let share = total.div_ceil(members);
        let (owned, draining): (Vec<u32>, usize) = {
            let st = self.shared.lock();
            let owned = st
                .parts
                .iter()
                .filter(|(_, p)| p.draining.is_none())
                .map(|(n, _)| *n)
                .collect();
            let draining = st.parts.values().filter(|p| p.draining.is_some()).count();
            (owned, draining)
        };
        if owned.len() as u32 > share {
            // Give up the highest-numbered extras; they are released once drained.
            let extra = owned.len() - share as usize;
            let mut st = self.shared.lock();
            for n in owned.iter().rev().take(extra) {
                if let Some(p) = st.parts.get_mut(n) {
                    p.draining = Some(Instant::now());
                }
            }
            drop(st);
            self.shared.supervisor.notify_one();
        } else if (owned.len() as u32) < share && draining == 0 {
            let mut have = owned.len() as u32;
            for i in 0..total {
                if have >= share {
                    break;
                }
                let p = (self.seed + i) % total;
                if self.shared.lock().parts.contains_key(&p) {
                    continue;
                }
                if self.claim(&control, p).await? {
                    have += 1;
                }
            }
        }
        self.apply_qos().await;
        Ok(())
    }

    /// Splits the member's prefetch over the channels of the partitions it owns, so
    /// what the broker has delivered to it and not had settled (in its key gates or
    /// handed out) stays within `max(prefetch, partitions owned)`, not prefetch per
    /// partition. Re-applied on every rebalance step, as ownership and holdings change.
    ///
    /// `global` qos, which RabbitMQ applies per channel (shared by the channel's
    /// consumers; here one): unlike a per-consumer limit, which only a later
    /// `basic.consume` picks up, a new value takes effect on the running consumer.
    ///
    /// A channel's limit is never set below what it holds plus the requeued messages on
    /// their way back: a lower limit would keep a requeued key head from returning
    /// while its successors, held in the gate, keep the slots. Lowering recalls nothing,
    /// so after ownership grows a channel may hold its old share until those messages
    /// are settled; the next steps bring it down.
    async fn apply_qos(&mut self) {
        let changes: Vec<(u32, u64, Channel, u16)> = {
            let st = self.shared.lock();
            let shares = prefetch_shares(self.shared.prefetch, st.parts.len());
            st.parts
                .iter()
                .zip(shares)
                .filter(|((_, part), _)| part.lost.is_none())
                .filter_map(|((p, part), share)| {
                    let held = part.gate.len() + part.in_flight + part.gate.awaiting();
                    let want = share.max(clamp_qos(held));
                    (want != part.qos).then(|| (*p, part.gen, part.channel.clone(), want))
                })
                .collect()
        };
        for (p, gen, channel, qos) in changes {
            match channel
                .basic_qos(qos, BasicQosOptions { global: true })
                .await
            {
                Ok(()) => {
                    if let Some(part) = self.shared.lock().parts.get_mut(&p) {
                        if part.gen == gen {
                            part.qos = qos;
                        }
                    }
                }
                // The channel is going away; its pump reports it and the partition is
                // claimed again with a fresh limit.
                Err(e) => tracing::debug!(partition = p, error = %e, "setting the prefetch failed"),
            }
        }
    }

    /// Warns once per delivery that has been unsettled for longer than
    /// [`ACK_TIMEOUT_WARNING`]: RabbitMQ closes the channel at its `consumer_timeout`
    /// (30 min by default) and the message is handled again.
    fn watch_ack_timeout(&self) {
        let mut st = self.shared.lock();
        let warned = st.warned_upto;
        let late: Vec<(u64, Duration)> = st
            .handed_out
            .range(warned + 1..)
            .take_while(|(_, at)| at.elapsed() > ACK_TIMEOUT_WARNING)
            .map(|(seq, at)| (*seq, at.elapsed()))
            .collect();
        if let Some((last, _)) = late.last() {
            st.warned_upto = *last;
        }
        drop(st);
        for (_, held) in late {
            tracing::warn!(
                topic = %self.shared.topic,
                group = %self.shared.group,
                held_secs = held.as_secs(),
                "a delivery is still unsettled; RabbitMQ closes the channel when it passes the \
                 broker's consumer_timeout (30 min by default) and the message is delivered again"
            );
        }
    }

    /// Tries to own partition `p` with an exclusive consumer: RabbitMQ lets one consumer
    /// at a time hold an exclusive subscription to a queue, and drops it with its channel
    /// or connection, so a crashed member's partitions become free at once.
    async fn claim(&mut self, control: &Channel, p: u32) -> Result<bool> {
        let Some(conn) = &self.conn else {
            return Ok(false);
        };
        let queue = self.names.partition(p);
        // Look first (on the control channel, where the queue surely exists), so a
        // taken partition costs no refused consume and no broker error log.
        let consumers = control
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err(&format!("looking at partition queue {queue:?}"), e))?
            .consumer_count();
        if consumers > 0 {
            return Ok(false);
        }
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| map_err("opening a channel", e))?;
        // The smallest share once this one is owned too; `apply_qos` evens them out.
        let owned = self.shared.lock().parts.len() + 1;
        let qos = prefetch_shares(self.shared.prefetch, owned)[owned - 1];
        ch.basic_qos(qos, BasicQosOptions { global: true })
            .await
            .map_err(|e| map_err("setting the prefetch", e))?;
        let tag = format!("switchyard-p{p}");
        let consumer = match ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            // ACCESS_REFUSED: another member got there first. The broker closed `ch`.
            Err(e) if soft_code(&e) == Some(403) => return Ok(false),
            Err(e) => return Err(map_err(&format!("consuming partition queue {queue:?}"), e)),
        };
        let gen = {
            let mut st = self.shared.lock();
            st.next_gen += 1;
            let gen = st.next_gen;
            st.parts.insert(
                p,
                Part {
                    gen,
                    channel: ch,
                    qos,
                    gate: Gate::default(),
                    in_flight: 0,
                    draining: None,
                    lost: None,
                    pump: None,
                },
            );
            gen
        };
        let pump = tokio::spawn(pump(self.shared.clone(), p, gen, consumer));
        if let Some(part) = self.shared.lock().parts.get_mut(&p) {
            if part.gen == gen {
                part.pump = Some(pump);
            }
        }
        Ok(true)
    }

    /// Lets go of a partition: closing its channel returns its unsettled messages to
    /// their original places in the queue and ends the exclusive consumer, together.
    async fn release(&mut self, part: Part) {
        if part.channel.status().connected() {
            let _ = part.channel.close(200, "rebalancing".into()).await;
        }
        if let Some(pump) = part.pump {
            pump.abort();
        }
    }
}

/// A `basic.qos` prefetch count: at least 1 (0 means unlimited), at most `u16::MAX`.
fn clamp_qos(n: usize) -> u16 {
    n.clamp(1, usize::from(u16::MAX)) as u16
}

/// `prefetch` split over `owned` channels, the remainder to the first ones: they add
/// up to `prefetch`, or to `owned` when each must have at least 1.
fn prefetch_shares(prefetch: usize, owned: usize) -> Vec<u16> {
    let Some(base) = prefetch.checked_div(owned) else {
        return Vec::new();
    };
    let rem = prefetch % owned;
    (0..owned)
        .map(|i| clamp_qos(base + usize::from(i < rem)))
        .collect()
}

/// Moves deliveries from one partition's consumer into the key gate.
async fn pump(shared: Arc<Shared>, p: u32, gen: u64, mut consumer: Consumer) {
    // However this task ends — the consumer's end, an error, or a panic — the partition
    // is marked lost and the supervisor told, so it gives the partition up and claims it
    // again instead of holding its exclusive consumer with nobody reading.
    let mut ended = PumpEnded {
        shared: shared.clone(),
        p,
        gen,
        reason: None,
    };
    while let Some(item) = consumer.next().await {
        match item {
            Ok(d) => {
                // Classic queues only flag a redelivery, and set the flag as well on
                // messages that were prefetched but never handed out (a partition handed
                // over), so it is not an attempt count; the gate counts the requeues of
                // this member exactly.
                let entry = Entry {
                    message: decode(&d.properties, d.data),
                    attempt: 1,
                    acker: d.acker,
                    requeued_head: false,
                };
                {
                    let mut st = shared.lock();
                    match st.parts.get_mut(&p) {
                        Some(part) if part.gen == gen => part.gate.arrive(entry),
                        // Being released: closing the channel returns the message. Keep
                        // the consumer until then (the release aborts this task after the
                        // close): dropping it sends basic.cancel, which frees the queue
                        // for another member while this channel still holds unacked
                        // messages, and that member would get later messages first.
                        _ => continue,
                    }
                }
                shared.wake.notify_waiters();
            }
            Err(e) => {
                ended.reason = Some(e.to_string());
                break;
            }
        }
    }
    ended
        .reason
        .get_or_insert_with(|| "the consumer was cancelled".to_string());
}

/// Fails the subscription if its supervisor panics: nobody would reconnect or claim
/// partitions any more, so the consumer must hear of it rather than wait forever.
struct SupervisorEnded(Arc<Shared>);

impl Drop for SupervisorEnded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut st = self.0.lock();
            if st.fatal.is_none() {
                st.fatal = Some(Error::permanent(
                    crate::BACKEND,
                    "the subscription's supervisor task panicked; no partition is read any more",
                ));
            }
            drop(st);
            self.0.wake.notify_waiters();
        }
    }
}

/// Marks a partition lost when its pump ends, panics included.
struct PumpEnded {
    shared: Arc<Shared>,
    p: u32,
    gen: u64,
    /// Why it ended; `None` while it runs (so a panic leaves it `None`).
    reason: Option<String>,
}

impl Drop for PumpEnded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                topic = %self.shared.topic,
                group = %self.shared.group,
                partition = self.p,
                "a partition's reader panicked; giving the partition up to claim it again"
            );
        }
        if let Some(part) = self.shared.lock().parts.get_mut(&self.p) {
            if part.gen == self.gen {
                part.lost = Some(
                    self.reason
                        .take()
                        .unwrap_or_else(|| "its reader stopped unexpectedly".to_string()),
                );
            }
        }
        self.shared.supervisor.notify_one();
    }
}

/// Marks a member closed by the broker handle's close.
pub(crate) fn close_shared(shared: &Shared) {
    shared.lock().closed = true;
    shared.wake.notify_waiters();
    shared.stop.cancel();
}

#[cfg(test)]
mod share_tests {
    use super::prefetch_shares;

    #[test]
    fn shares_add_up_to_the_prefetch_with_at_least_one_each() {
        assert_eq!(prefetch_shares(12, 8), vec![2, 2, 2, 2, 1, 1, 1, 1]);
        assert_eq!(prefetch_shares(12, 4), vec![3, 3, 3, 3]);
        assert_eq!(prefetch_shares(3, 8), vec![1; 8]);
        assert_eq!(prefetch_shares(1_000_000, 2), vec![u16::MAX; 2]);
        assert!(prefetch_shares(12, 0).is_empty());
    }
}

/// Hand-over against the real broker (`scripts/test` starts RabbitMQ; the test fails
/// when it does not answer). Internal, because it drives two members' claim and release
/// steps by hand to hit the moment that broke order.
#[cfg(test)]
mod handover_tests {
    use super::*;
    use lapin::options::{BasicPublishOptions, ExchangeDeleteOptions, QueueDeleteOptions};

    fn url() -> String {
        std::env::var("SWITCHYARD_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
    }

    async fn member(config: &Arc<RabbitConfig>, topic: &str) -> Supervisor {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            supervisor: Notify::new(),
            stop: CancellationToken::new(),
            topic: topic.into(),
            group: "g".into(),
            prefetch: 1000,
        });
        let mut sup = Supervisor {
            shared,
            config: config.clone(),
            names: GroupNames::new(topic, "g"),
            conn: None,
            control: None,
            membership: None,
            seed: 0,
            expires: None,
        };
        sup.connect()
            .await
            .expect("RabbitMQ on SWITCHYARD_AMQP_URL (scripts/test starts it)");
        sup
    }

    async fn publish(control: &Channel, queue: &str, range: std::ops::Range<usize>) {
        for i in range {
            let m = Message::new(i.to_string());
            control
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &m.payload,
                    crate::codec::properties(&m).expect("encodable"),
                )
                .await
                .expect("publish");
        }
    }

    fn received(m: &Supervisor) -> usize {
        m.shared.lock().parts.get(&0).map_or(0, |p| p.gate.len())
    }

    /// A partition being released keeps receiving until its channel closes. Its pump
    /// used to drop the consumer at the first such delivery, which sends basic.cancel:
    /// RabbitMQ then let the next member consume while the old channel still held its
    /// unacked messages, and that member got later messages first (found as per-key
    /// order violations while members joined). The next owner must start with the
    /// oldest message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_owner_starts_with_the_messages_the_last_one_held() {
        let config = Arc::new(RabbitConfig::from_url(&url()).expect("valid URL"));
        for round in 0..3 {
            let topic = format!("sy-handover-{}", switchyard_core::new_id());
            let mut a = member(&config, &topic).await;
            let mut b = member(&config, &topic).await;
            let control = a.control.clone().expect("connected");
            assert!(a.claim(&control, 0).await.expect("claim"), "free partition");
            let queue = a.names.partition(0);
            publish(&control, &queue, 0..50).await;
            let start = Instant::now();
            while received(&a) < 50 {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "A got {}",
                    received(&a)
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Rebalance takes the partition out of A's state, then releases it; more
            // messages arrive in between (other partitions are released first).
            let part = a
                .shared
                .lock()
                .parts
                .remove(&0)
                .expect("A owns partition 0");
            let control_b = b.control.clone().expect("connected");
            let claimer = tokio::spawn(async move {
                while !b.claim(&control_b, 0).await.expect("claim attempt") {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                b
            });
            for i in 50..100 {
                publish(&control, &queue, i..i + 1).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            a.release(part).await;
            let b = tokio::time::timeout(Duration::from_secs(10), claimer)
                .await
                .expect("B claims the released partition")
                .expect("claimer task");
            let first = loop {
                let taken = b
                    .shared
                    .lock()
                    .parts
                    .get_mut(&0)
                    .and_then(|p| p.gate.take(false));
                if let Some(entry) = taken {
                    break entry;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            assert_eq!(
                String::from_utf8_lossy(&first.message.payload),
                "0",
                "round {round}: the next owner got a later message before the ones handed back"
            );
            // Tidy up this throwaway topic's queues and exchanges.
            for p in 0..config.partitions {
                let _ = control
                    .queue_delete(
                        a.names.partition(p).as_str().into(),
                        QueueDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = control
                .queue_delete(
                    a.names.members().as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
            for exchange in [topic.clone(), a.names.return_exchange()] {
                let _ = control
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            for mut m in [a, b] {
                m.shutdown().await;
            }
        }
    }
}
