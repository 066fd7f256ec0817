//! Fault injection: failing publishes, slow acks, consumers that die.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::MemoryBroker;
#[cfg(doc)]
use switchyard_core::Error;

/// The faults in force, shared by a broker's handles, subscriptions and ack handles.
#[derive(Default)]
pub(crate) struct FaultState {
    failing_publishes: AtomicU64,
    ack_delay_us: AtomicU64,
}

impl FaultState {
    /// Whether this publish call is one of those told to fail (counting it if so).
    pub(crate) fn publish_fails(&self) -> bool {
        self.failing_publishes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// How long each ack and nack waits before it takes effect, if at all.
    pub(crate) fn ack_delay(&self) -> Option<Duration> {
        match self.ack_delay_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
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
    pub(crate) fn new(broker: MemoryBroker) -> Self {
        Self { broker }
    }

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
        let Some(t) = self.broker.inner.topics.lock().get(topic).cloned() else {
            return 0;
        };
        let dropped = {
            let mut state = t.state.lock();
            let n = state.groups.iter_mut().map(|(_, g)| g.leave_all()).sum();
            state.drop_expired();
            n
        };
        t.changed.notify_waiters();
        dropped
    }
}
