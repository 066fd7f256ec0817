//! Scheduled publish: a delay topic per topic, drained by a scheduler that republishes
//! each message to its topic once it is due.
//!
//! `publish_at(T, m, when)` writes `m` to the delay topic `T.scheduled`, wrapped in an
//! envelope that carries the due time and the message's key (the delay record itself
//! has no key, so a same-key message due sooner never waits behind a later one), and
//! starts this client's scheduler for `T`: a member of the consumer group
//! `T.scheduler` on `T.scheduled`. The scheduler holds up to [`WINDOW`] waiting records
//! unsettled, republishes each to `T` when it is due, with its id, key, headers,
//! payload and timestamp, and only then acks it, so its offset is committed after the
//! republish. What the delay topic holds survives any consumer's restart; a scheduler
//! that stops (its client closed or crashed) leaves its records for the next member of
//! `T.scheduler`, which is any client that schedules on `T` again or calls
//! [`KafkaBroker::start_scheduler`]. A scheduler whose subscription fails joins again.
//! A due message this client can never publish (larger than its `max_message_size`,
//! or with reserved header names: written by another producer or a client with other
//! limits) is dropped with an error naming its id, not retried with the others held
//! behind it.
//!
//! There are no transactions (tansu has none), so a republish and its commit are two
//! steps, and a duplicate can occur in exactly one place: a record republished to `T`
//! whose offset was not yet committed when its scheduler stopped without committing
//! (a crash, or a rebalance that timed out). The next member reads again from the
//! committed position, a partition's lowest offset not yet republished, and republishes
//! what follows it once more: the records republished within the last commit interval,
//! and those after a record still waiting in the same partition. Duplicates keep their
//! message id, so the idempotency layer drops them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use switchyard_core::backend::{check_headers, validate_name, Backoff, MAX_NAME_LEN};
use switchyard_core::{
    CancellationToken, Delivery, Error, Message, Publisher, Receipt, Result, SubscribeOptions,
    Subscriber,
};
use tokio::task::JoinHandle;

use crate::broker::{Inner, KafkaBroker};

/// How many waiting records one scheduler member holds unsettled at most. A record
/// beyond it is read once one of those has been republished, so it can be late by as
/// much as the wait of the records ahead of it (the limit bounds the member's memory).
pub(crate) const WINDOW: usize = 10_000;

/// The suffix of a topic's delay topic.
const DELAY_SUFFIX: &str = ".scheduled";
/// The suffix of its scheduler's consumer group.
const GROUP_SUFFIX: &str = ".scheduler";
/// What an envelope starts with, so a record some other client wrote is told apart.
const MAGIC: &[u8; 8] = b"sy-sched";
/// Pauses between a scheduler's tries to subscribe or to republish.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// The schedulers this client runs, one per topic it scheduled on. They hold the
/// client weakly and stop when it is closed or dropped.
#[derive(Default)]
pub(crate) struct Schedulers {
    running: Mutex<HashMap<String, JoinHandle<()>>>,
    cancel: CancellationToken,
}

impl Schedulers {
    /// Stops every scheduler: each closes its subscription, which commits what was
    /// republished; the records still waiting stay in the delay topic.
    pub(crate) async fn close(&self) {
        self.cancel.cancel();
        let tasks: Vec<_> = self.running.lock().drain().map(|(_, t)| t).collect();
        for task in tasks {
            match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(())) => {}
                Ok(Err(ended)) => tracing::error!(error = %ended, "a scheduler task died"),
                Err(_) => tracing::warn!("a scheduler did not stop within 30 s; left running"),
            }
        }
    }
}

impl Drop for Schedulers {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The delay topic of `topic`, checked against the name rules.
fn delay_topic(topic: &str) -> Result<String> {
    validate_name("topic", topic)?;
    let name = format!("{topic}{DELAY_SUFFIX}");
    // The scheduler consumes it, and a consumed topic leaves room for `.dlq`.
    let limit = MAX_NAME_LEN - ".dlq".len();
    if name.len() > limit {
        return Err(Error::InvalidName {
            what: "topic",
            name: topic.to_string(),
            reason: format!(
                "its delay topic {name:?} would leave no room for a dead-letter suffix within the {MAX_NAME_LEN}-byte limit on names; a topic scheduled on may have at most {} bytes",
                limit - DELAY_SUFFIX.len()
            ),
        });
    }
    Ok(name)
}

/// Milliseconds since the epoch, rounded up: a due time is never moved earlier.
fn due_ms(when: SystemTime) -> u64 {
    when.duration_since(UNIX_EPOCH).map_or(0, |d| {
        u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
    })
}

/// The delay record of `message`: same id and headers, no key, and as payload
/// `MAGIC, due (u64 BE ms), key present (u8), key length (u32 BE), key, payload`.
fn wrap(message: &Message, due: u64) -> Message {
    let key = message.key.as_deref().map(str::as_bytes);
    let mut body = Vec::with_capacity(21 + key.map_or(0, <[u8]>::len) + message.payload.len());
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&due.to_be_bytes());
    body.push(u8::from(key.is_some()));
    let key = key.unwrap_or_default();
    body.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_be_bytes());
    body.extend_from_slice(key);
    body.extend_from_slice(&message.payload);
    let mut record = Message::new(body);
    record.id = message.id.clone();
    record.headers = message.headers.clone();
    record.timestamp = message.timestamp;
    record
}

/// The message a delay record carries and when it is due; `None` for anything that is
/// not an envelope.
fn unwrap(record: &Message) -> Option<(u64, Message)> {
    let body = &record.payload;
    let rest = body.strip_prefix(MAGIC)?;
    let due = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let has_key = *rest.get(8)?;
    let len = u32::from_be_bytes(rest.get(9..13)?.try_into().ok()?) as usize;
    let key = rest.get(13..13usize.checked_add(len)?)?;
    let key = match has_key {
        0 => None,
        1 => Some(String::from_utf8(key.to_vec()).ok()?),
        _ => return None,
    };
    let start = body.len() - rest.len() + 13 + len;
    let mut message = Message::new(body.slice(start..));
    message.id = record.id.clone();
    message.key = key;
    message.headers = record.headers.clone();
    message.timestamp = record.timestamp;
    Some((due, message))
}

impl KafkaBroker {
    /// Writes `message` to `topic`'s delay topic to be republished no sooner than
    /// `when`, and makes sure this client runs the topic's scheduler. A time already
    /// past is an ordinary publish.
    pub(crate) async fn schedule(
        &self,
        topic: &str,
        message: Message,
        when: SystemTime,
    ) -> Result<Receipt> {
        self.check_open()?;
        let delay_topic = delay_topic(topic)?;
        check_headers(&message)?;
        crate::record::check_header_names(&message)?;
        if when <= SystemTime::now() {
            return self.publish(topic, message).await;
        }
        self.ensure_topic(topic).await?;
        let id = message.id.clone();
        self.publish(&delay_topic, wrap(&message, due_ms(when)))
            .await?;
        self.start_scheduler(topic)?;
        Ok(Receipt::new(id, None, None))
    }

    /// Runs a scheduler for `topic` in this client (once per topic; later calls do
    /// nothing): a member of the group `<topic>.scheduler` that republishes the
    /// messages of `<topic>.scheduled` to `topic` when they are due. A client that
    /// schedules on a topic starts it by itself; a process that should deliver what
    /// an earlier one scheduled, before scheduling anything, calls this at start. It
    /// runs until the client is closed.
    pub fn start_scheduler(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        let delay_topic = delay_topic(topic)?;
        let schedulers = &self.inner.schedulers;
        let mut running = schedulers.running.lock();
        if running.get(topic).is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        let task = tokio::spawn(run(
            Arc::downgrade(&self.inner),
            topic.to_string(),
            delay_topic,
            schedulers.cancel.child_token(),
        ));
        running.insert(topic.to_string(), task);
        Ok(())
    }
}

/// One scheduler member: joins, then republishes what comes due until `cancel` or the
/// client is gone. A subscription that fails (the broker refusing the group after a
/// credential change, say) is left and joined again: a scheduler that stopped there
/// would leave every scheduled message waiting until the process restarts.
async fn run(inner: Weak<Inner>, topic: String, delay_topic: String, cancel: CancellationToken) {
    let group = format!("{topic}{GROUP_SUFFIX}");
    let mut pauses = RETRY.pauses();
    loop {
        let Some(broker) = inner.upgrade().map(|inner| KafkaBroker { inner }) else {
            return;
        };
        let options = SubscribeOptions::new(&delay_topic, &group).prefetch(WINDOW);
        let joined = tokio::select! {
            () = cancel.cancelled() => return,
            r = broker.subscribe(options) => r,
        };
        drop(broker);
        let failed = match joined {
            Ok(sub) => {
                pauses = RETRY.pauses();
                match serve(&inner, &topic, sub, &cancel).await {
                    Served::Stopped => return,
                    Served::Failed(error) => {
                        tracing::warn!(%error, topic, "the scheduler's subscription failed; joining again");
                        continue;
                    }
                }
            }
            Err(error) => error,
        };
        tracing::warn!(error = %failed, topic, "the scheduler could not join; trying again");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(5))) => {}
        }
    }
}

/// How a scheduler's subscription ended.
enum Served {
    /// Cancelled, or the client is gone.
    Stopped,
    /// The subscription failed; the member joins again.
    Failed(Error),
}

/// Republishes what comes due from one subscription until it ends, then closes it,
/// which commits what was republished; what still waits goes back to the delay topic's
/// next reader.
async fn serve(
    inner: &Weak<Inner>,
    topic: &str,
    mut sub: Box<dyn switchyard_core::Subscription>,
    cancel: &CancellationToken,
) -> Served {
    let mut waiting = Waiting::default();
    let mut buf = Vec::new();
    let mut failures = 0;
    let served = loop {
        let next = waiting.next_due();
        tokio::select! {
            () = cancel.cancelled() => break Served::Stopped,
            r = sub.recv_many(&mut buf, WINDOW) => match r {
                Ok(0) => break Served::Failed(Error::transient(
                    crate::broker::BACKEND,
                    "the scheduler's subscription ended",
                )),
                Ok(_) => {
                    for d in buf.drain(..) {
                        waiting.add(d).await;
                    }
                }
                Err(error) => break Served::Failed(error),
            },
            () = sleep_until(next) => {
                let Some(broker) = inner.upgrade().map(|inner| KafkaBroker { inner }) else {
                    break Served::Stopped;
                };
                match waiting.republish_due(&broker, topic).await {
                    Ok(()) => failures = 0,
                    Err(error) => {
                        failures += 1;
                        let pause = RETRY.pause(failures);
                        tracing::warn!(%error, topic, ?pause, "republishing due messages failed; trying again");
                        tokio::select! {
                            () = cancel.cancelled() => break Served::Stopped,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                }
            }
        }
    };
    drop(waiting);
    if let Err(error) = sub.close().await {
        tracing::warn!(%error, topic, "closing the scheduler's subscription failed");
    }
    served
}

/// Sleeps until `due` (ms since the epoch) on the wall clock, or forever for `None`.
async fn sleep_until(due: Option<u64>) {
    let Some(due) = due else {
        return std::future::pending().await;
    };
    let at = UNIX_EPOCH + Duration::from_millis(due);
    // tokio's timers follow the monotonic clock: check the wall clock again after.
    while let Ok(left) = at.duration_since(SystemTime::now()) {
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left).await;
    }
}

/// The delay records a scheduler holds, by due time.
#[derive(Default)]
struct Waiting {
    by_due: BTreeMap<(u64, u64), (Delivery, Message)>,
    next_seq: u64,
}

impl Waiting {
    /// Files a delay record; acks (drops, with a warning) one that is no envelope.
    async fn add(&mut self, d: Delivery) {
        match unwrap(d.message()) {
            Some((due, message)) => {
                self.next_seq += 1;
                self.by_due.insert((due, self.next_seq), (d, message));
            }
            None => {
                tracing::warn!(
                    id = d.id(),
                    topic = d.topic(),
                    "a record of a delay topic is not a scheduled message; skipped"
                );
                let _ = d.ack().await;
            }
        }
    }

    fn next_due(&self) -> Option<u64> {
        self.by_due.keys().next().map(|(due, _)| *due)
    }

    /// Republishes every message now due, in due order, then acks their records. On
    /// error they all stay, to be republished again (some may have gone out: the
    /// duplicates the module docs describe).
    async fn republish_due(&mut self, broker: &KafkaBroker, topic: &str) -> Result<()> {
        // Whole milliseconds passed, rounded down: a due time at or before it has come.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let due: Vec<(u64, u64)> = self
            .by_due
            .range(..(now.saturating_add(1), 0))
            .map(|(k, _)| *k)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let mut messages = Vec::with_capacity(due.len());
        let mut publishable = Vec::with_capacity(due.len());
        for k in due {
            let (d, message) = &self.by_due[&k];
            // A message this client can never publish (written by another producer, or
            // by a client allowing larger messages) would fail every batch it is in and
            // hold its partition's commit for good: it is dropped, with the reason.
            if let Err(refused) = can_publish(broker, message) {
                tracing::error!(id = d.id(), topic, error = %refused, "a scheduled message can never be published from this client; dropped");
                let (d, _) = self.by_due.remove(&k).expect("filed above");
                let _ = d.ack().await;
                continue;
            }
            messages.push(message.clone());
            publishable.push(k);
        }
        if messages.is_empty() {
            return Ok(());
        }
        broker.publish_batch(topic, messages).await?;
        for k in publishable {
            let (d, _) = self.by_due.remove(&k).expect("filed above");
            if let Err(error) = d.ack().await {
                // The record comes back to a scheduler and is republished again.
                tracing::warn!(%error, id = d.id(), "acking a republished delay record failed");
            }
        }
        Ok(())
    }
}

/// Whether `message` passes this client's checks before a publish.
fn can_publish(broker: &KafkaBroker, message: &Message) -> Result<()> {
    check_headers(message)?;
    crate::record::check_header_names(message)?;
    broker.check_size(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_carries_the_message_and_its_due_time() {
        let m = Message::new(vec![0u8, 255, 7])
            .with_key("kéy")
            .with_header("h", "v");
        let record = wrap(&m, 1_234_567);
        assert_eq!(record.key, None, "the delay record has no key");
        assert_eq!((&record.id, &record.headers), (&m.id, &m.headers));
        let (due, back) = unwrap(&record).unwrap();
        assert_eq!(due, 1_234_567);
        assert_eq!(back, m);
        let unkeyed = Message::new("x");
        assert_eq!(unwrap(&wrap(&unkeyed, 9)).unwrap().1, unkeyed);
    }

    #[test]
    fn anything_else_is_no_envelope() {
        for body in [
            &b""[..],
            b"sy-sched",
            b"plain payload",
            b"sy-sched\0\0\0\0\0\0\0\x01\x01\0\0\0\x09k",
        ] {
            assert!(unwrap(&Message::new(body.to_vec())).is_none(), "{body:?}");
        }
    }

    #[test]
    fn due_times_round_up_and_names_leave_room_for_the_suffix() {
        let t = UNIX_EPOCH + Duration::from_micros(1500);
        assert_eq!(due_ms(t), 2);
        assert_eq!(delay_topic("orders").unwrap(), "orders.scheduled");
        assert!(delay_topic(&"t".repeat(MAX_NAME_LEN - 4 - DELAY_SUFFIX.len())).is_ok());
        assert!(delay_topic(&"t".repeat(MAX_NAME_LEN - 3 - DELAY_SUFFIX.len())).is_err());
        let err = delay_topic(&"t".repeat(MAX_NAME_LEN)).unwrap_err();
        assert!(err.to_string().contains("delay topic"), "{err}");
    }
}
