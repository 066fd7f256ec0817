//! Publishing: appending to a topic's log, waiting for room when it is full.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use switchyard_core::backend::check_headers;
use switchyard_core::{Error, Message, Publisher, Receipt, Result};

use crate::broker::BACKEND;
use crate::topic::Waiting;
use crate::MemoryBroker;

/// How many messages one publish call must add before it reschedules itself after
/// waking consumers (see `append`).
const RESCHEDULE_AFTER: usize = 16;

/// Returns `Pending` once after waking its own task: the task goes back to its
/// scheduler's queue at once (unlike `tokio::task::yield_now`, which waits until the
/// worker is otherwise idle, so the woken consumers would run first and alone).
struct Reschedule(bool);

impl Future for Reschedule {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl MemoryBroker {
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

    /// Appends `messages` to `topic` in order, waiting for room up to the publish timeout.
    async fn append(&self, topic: &str, messages: Vec<Message>) -> Result<Vec<Receipt>> {
        for m in &messages {
            check_headers(m)?;
            self.check_size(m)?;
        }
        if self.inner.faults.publish_fails() {
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
