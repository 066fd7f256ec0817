//! Settling a delivery: the broker hears of it, and the member's bookkeeping (the key
//! gate, the unsettled count, a hand-over waiting for in-flight messages) follows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use switchyard_core::backend::Acker;
use switchyard_core::{Error, Message, Nack, Result};

use crate::subscription::Shared;

/// How a delivery was settled, for the key gate.
enum Settle {
    Done,
    Requeue,
}

/// The ack handle of one delivery.
pub(crate) struct RabbitAcker {
    pub(crate) shared: Arc<Shared>,
    pub(crate) part: u32,
    pub(crate) gen: u64,
    pub(crate) message: Arc<Message>,
    pub(crate) attempt: u32,
    pub(crate) inner: lapin::Acker,
    pub(crate) done: AtomicBool,
    /// Hand-out number, for the ack-timeout watch.
    pub(crate) seq: u64,
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
            let mut st = self.shared.state.lock();
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
        let st = self.shared.state.lock();
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
