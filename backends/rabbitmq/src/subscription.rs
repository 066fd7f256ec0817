//! A member of a group as its consumer sees it: the partitions it owns, each with its
//! key gate, and `recv_many` handing out what the gates let through.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use lapin::Channel;
use parking_lot::Mutex;
use switchyard_core::{
    CancellationToken, Delivery, Error, Origin, Result, SubscribeOptions, Subscription,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::acker::RabbitAcker;
use crate::config::RabbitConfig;
use crate::gate::{Entry, Gate};
use crate::supervisor::Supervisor;
use crate::topology::GroupNames;

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Wakes receivers: something arrived or was settled.
    pub(crate) wake: Notify,
    /// Wakes the supervisor: a partition died or finished draining.
    pub(crate) supervisor: Notify,
    pub(crate) stop: CancellationToken,
    pub(crate) topic: Arc<str>,
    pub(crate) group: Arc<str>,
    pub(crate) prefetch: usize,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) closed: bool,
    pub(crate) parts: BTreeMap<u32, Part>,
    /// Deliveries handed out and not settled, across partitions and reconnections.
    pub(crate) unsettled: usize,
    pub(crate) cursor: usize,
    pub(crate) fatal: Option<Error>,
    pub(crate) next_gen: u64,
    /// When each unsettled delivery was handed out, by hand-out number: the oldest is
    /// checked against RabbitMQ's consumer ack timeout.
    pub(crate) handed_out: BTreeMap<u64, Instant>,
    pub(crate) next_hand_out: u64,
    /// The newest hand-out number already warned about.
    pub(crate) warned_upto: u64,
}

pub(crate) struct Part {
    /// Tells this ownership from an earlier one of the same partition, so a stale
    /// delivery never settles into the new one's accounting.
    pub(crate) gen: u64,
    pub(crate) channel: Channel,
    /// The channel's prefetch limit (`basic.qos`, global) as last applied.
    pub(crate) qos: u16,
    pub(crate) gate: Gate,
    pub(crate) in_flight: usize,
    pub(crate) draining: Option<Instant>,
    /// Set by the pump when the consumer ended (channel closed, connection lost).
    pub(crate) lost: Option<String>,
    pub(crate) pump: Option<JoinHandle<()>>,
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
    let first_look = (crate::topology::key_hash(&switchyard_core::new_id())
        % u64::from(crate::topology::SLOTS)) as u32;
    let mut sup = Supervisor {
        shared: shared.clone(),
        config,
        names,
        conn: None,
        control: None,
        membership: None,
        first_look,
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
            // The first key to be freed from waiting on a requeued message that may
            // never come back: the wait below ends then, with or without a wake-up.
            let next_release;
            {
                let mut guard = self.shared.state.lock();
                let st = &mut *guard;
                if st.closed {
                    return Ok(0);
                }
                if let Some(e) = st.fatal.take() {
                    return Err(e);
                }
                let now = Instant::now();
                for part in st.parts.values_mut() {
                    part.gate.release_overdue(now);
                }
                next_release = st
                    .parts
                    .values()
                    .filter_map(|p| p.gate.next_release())
                    .min();
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
            match next_release {
                Some(at) => {
                    let at = tokio::time::Instant::from_std(at);
                    let _ = tokio::time::timeout_at(at, notified).await;
                }
                None => notified.await,
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.shared.state.lock().closed = true;
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
            self.shared.state.lock().closed = true;
            self.shared.stop.cancel();
        }
    }
}

/// Marks a member closed by the broker handle's close.
pub(crate) fn close_shared(shared: &Shared) {
    shared.state.lock().closed = true;
    shared.wake.notify_waiters();
    shared.stop.cancel();
}
