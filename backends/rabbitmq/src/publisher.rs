//! Publishing: one connection and one confirm-mode channel per broker handle, rebuilt
//! after a connection loss. A publish rides out a loss: what the broker did not confirm
//! goes out again on the next connection, until the broker confirms nothing for
//! `confirm_timeout`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};
use switchyard_core::backend::validate_name;
use switchyard_core::{Error, Message, Receipt, Result};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::codec::properties;
use crate::config::RabbitConfig;
use crate::connection::{connect_within, RECONNECT};
use crate::error::map_err;
use crate::schedule;
use crate::topology::{
    declare_delay, declare_topic, key_hash, slot_routing_keys, GroupNames, SLOTS,
};
use crate::BACKEND;

/// How many publishes may wait for their confirm at once in a batch; bounds memory while
/// keeping the pipe full.
const CONFIRM_WINDOW: usize = 4096;

struct Live {
    conn: Connection,
    channel: Channel,
    /// What this connection declared: topic names, and `hold:<queue>` for the objects of
    /// a delayed redelivery (topic names cannot contain ':', so the two never clash).
    /// Forgotten with the connection, so a broker that lost them gets them again.
    declared: HashSet<String>,
    /// How many levels of each topic's scheduled-publish cascade this connection
    /// declared, by `schedule:<topic>`.
    declared_levels: HashMap<String, u32>,
}

/// What a publish needs declared before it goes out.
#[derive(Clone, Copy)]
enum Needs<'a> {
    /// The topic's exchange.
    Topic(&'a str),
    /// A group's hold queue for one delay, and what it dead-letters into.
    Hold { names: &'a GroupNames, ms: u64 },
    /// The lowest `levels` levels of a topic's scheduled-publish cascade.
    Schedule { topic: &'a str, levels: u32 },
}

/// A message ready to send. Properties and routing key are fixed once, so a retry sends
/// exactly what the first attempt sent (same id, same partition).
struct Outgoing<'a> {
    message: &'a Message,
    props: BasicProperties,
    routing_key: ShortString,
}

pub(crate) struct PublisherCore {
    config: Arc<RabbitConfig>,
    live: Mutex<Option<Live>>,
    routing: Vec<ShortString>,
    next_slot: AtomicU64,
    closed: std::sync::atomic::AtomicBool,
}

/// The delay in whole milliseconds, rounded up; RabbitMQ's `x-message-ttl` is at most
/// 2^32 - 1 ms (about 49 days).
fn delay_ms(delay: Duration) -> Result<u64> {
    let ms = delay.as_nanos().div_ceil(1_000_000);
    u32::try_from(ms).map(u64::from).map_err(|_| {
        Error::config(
            "delay",
            format!(
                "{delay:?} is longer than RabbitMQ's longest message TTL, 2^32 - 1 ms (about 49 days)"
            ),
        )
    })
}

/// Why a publish failed after it was sent.
#[derive(Debug)]
pub struct Unroutable {
    /// The topic.
    pub topic: String,
    /// The message id.
    pub id: String,
}

impl std::fmt::Display for Unroutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "message {} to topic {:?} was returned unroutable: no group is subscribed to the topic \
             (RabbitMQ keeps messages only for groups that exist when they are published; \
             subscribe first)",
            self.id, self.topic
        )
    }
}

impl std::error::Error for Unroutable {}

impl PublisherCore {
    pub(crate) fn new(config: Arc<RabbitConfig>) -> Self {
        Self {
            config,
            live: Mutex::new(None),
            routing: slot_routing_keys(),
            next_slot: AtomicU64::new(0),
            closed: Default::default(),
        }
    }

    /// A live channel with confirms on and what `needs` declared, connecting first if
    /// need be (that attempt bounded by `deadline`).
    async fn channel_for(&self, needs: Needs<'_>, deadline: Instant) -> Result<Channel> {
        let mut live = self.live.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { backend: BACKEND });
        }
        let healthy = live
            .as_ref()
            .is_some_and(|l| l.conn.status().connected() && l.channel.status().connected());
        if !healthy {
            if let Some(old) = live.take() {
                crate::connection::close_connection(&old.conn, "reconnecting").await;
            }
            // One attempt: the caller's retry loop owns the backoff and the deadline.
            // Given up a little before the caller's deadline, so that the caller sees
            // this error, which names the handshake, rather than its own timeout.
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = left.saturating_sub(Duration::from_millis(20));
            let conn = connect_within(&self.config, "publisher", limit).await?;
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| map_err("opening the publish channel", e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| map_err("enabling publisher confirms", e))?;
            *live = Some(Live {
                conn,
                channel,
                declared: HashSet::new(),
                declared_levels: HashMap::new(),
            });
        }
        let l = live.as_mut().expect("connected above");
        match needs {
            Needs::Topic(topic) => {
                if !l.declared.contains(topic) {
                    declare_topic(&l.conn, topic).await?;
                    l.declared.insert(topic.to_string());
                }
            }
            Needs::Hold { names, ms } => {
                let key = format!("hold:{}", names.hold(ms));
                if !l.declared.contains(&key) {
                    declare_delay(
                        &l.conn,
                        names,
                        self.config.partitions,
                        self.config.dead_letter_exchange.as_deref(),
                        ms,
                    )
                    .await?;
                    l.declared.insert(key);
                }
            }
            Needs::Schedule { topic, levels } => {
                // Levels are declared lowest first, so the count declared so far is
                // remembered per topic, and only the missing ones are added.
                let key = format!("schedule:{topic}");
                let have = l.declared_levels.get(&key).copied().unwrap_or(0);
                if have < levels {
                    schedule::declare_levels(&l.conn, topic, have, levels).await?;
                    l.declared_levels.insert(key, levels);
                }
            }
        }
        Ok(l.channel.clone())
    }

    fn routing_key(&self, message: &Message) -> ShortString {
        let slot = match &message.key {
            Some(k) => (key_hash(k) % u64::from(SLOTS)) as usize,
            // Unkeyed messages go round-robin over the slots, so over every partition.
            None => (self.next_slot.fetch_add(1, Ordering::Relaxed) % u64::from(SLOTS)) as usize,
        };
        self.routing[slot].clone()
    }

    fn check(&self, message: &Message) -> Result<()> {
        let limit = self.config.max_message_size;
        if message.payload.len() > limit {
            return Err(Error::MessageTooLarge {
                id: message.id.clone(),
                size: message.payload.len(),
                limit,
                backend: BACKEND,
            });
        }
        Ok(())
    }

    fn outgoing<'a>(&self, message: &'a Message) -> Result<Outgoing<'a>> {
        self.check(message)?;
        Ok(Outgoing {
            message,
            props: properties(message)?,
            routing_key: self.routing_key(message),
        })
    }

    /// Publishes `messages` to `topic` and returns once the broker confirmed all of them.
    ///
    /// A connection or channel lost mid-publish is ridden out: the messages not yet
    /// confirmed go out again, with the same ids, on a new connection (reconnecting with
    /// a jittered backoff), as long as the broker confirmed something within the last
    /// `confirm_timeout`. A message the broker received but whose confirm died with the
    /// connection is then sent twice: dropping such duplicates by message id is the
    /// idempotency layer's job. A broker that stays unreachable past `confirm_timeout`
    /// fails the call with a transient error naming the last cause. An unroutable
    /// message (no group queue took it) is a permanent error at once, never retried.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Receipt>> {
        validate_name("topic", topic)?;
        let outgoing = messages
            .iter()
            .map(|m| self.outgoing(m))
            .collect::<Result<Vec<_>>>()?;
        self.send(Needs::Topic(topic), topic, topic, &outgoing)
            .await?;
        drop(outgoing);
        Ok(messages
            .into_iter()
            .map(|m| Receipt::new(m.id, None, None))
            .collect())
    }

    /// Sends `outgoing` to `exchange` until the broker confirmed every message,
    /// retrying what is unconfirmed after a transient failure (see [`Self::publish`]).
    async fn send(
        &self,
        needs: Needs<'_>,
        exchange: &str,
        topic: &str,
        outgoing: &[Outgoing<'_>],
    ) -> Result<()> {
        let mut confirmed = vec![false; outgoing.len()];
        let mut deadline = Instant::now() + self.config.confirm_timeout;
        let mut failures = 0;
        loop {
            let err = match self
                .attempt(
                    needs,
                    exchange,
                    topic,
                    outgoing,
                    &mut confirmed,
                    &mut deadline,
                )
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            // `Closed` is transient for callers in general, but this client is done.
            if !err.is_transient() || matches!(err, Error::Closed { .. }) {
                return Err(err);
            }
            let unconfirmed = confirmed.iter().filter(|c| !**c).count();
            failures += 1;
            let pause = RECONNECT.pause(failures);
            if Instant::now() + pause >= deadline {
                return Err(Error::transient(
                    BACKEND,
                    format!(
                        "gave up publishing {unconfirmed} of {} messages to {exchange:?}: the \
                         broker confirmed none of them for {:?} (confirm_timeout), reconnecting \
                         as needed; last error: {err}",
                        outgoing.len(),
                        self.config.confirm_timeout
                    ),
                ));
            }
            tracing::warn!(
                error = %err,
                exchange,
                unconfirmed,
                ?pause,
                "publish interrupted; sending the unconfirmed messages again"
            );
            tokio::time::sleep(pause).await;
        }
    }

    /// One try at sending the messages not yet `confirmed`, on the current channel (or a
    /// new one). Every confirm received pushes `deadline` to `confirm_timeout` from now.
    async fn attempt(
        &self,
        needs: Needs<'_>,
        exchange: &str,
        topic: &str,
        outgoing: &[Outgoing<'_>],
        confirmed: &mut [bool],
        deadline: &mut Instant,
    ) -> Result<()> {
        let channel = tokio::time::timeout_at(*deadline, self.channel_for(needs, *deadline))
            .await
            .map_err(|_| Error::Timeout {
                after: self.config.confirm_timeout,
                what: format!("a publish channel to {}", self.config.redacted_url),
            })??;
        let exchange = ShortString::from(exchange);
        let todo: Vec<usize> = (0..outgoing.len()).filter(|&i| !confirmed[i]).collect();
        let mut pending: VecDeque<(usize, PublisherConfirm)> = VecDeque::new();
        for i in todo {
            if pending.len() >= CONFIRM_WINDOW {
                let (j, confirm) = pending.pop_front().expect("non-empty");
                self.await_confirm(topic, outgoing[j].message, confirm, *deadline)
                    .await?;
                confirmed[j] = true;
                *deadline = Instant::now() + self.config.confirm_timeout;
            }
            let o = &outgoing[i];
            let write = channel.basic_publish(
                exchange.clone(),
                o.routing_key.clone(),
                BasicPublishOptions {
                    // A message no queue takes comes back: an error, not a loss.
                    mandatory: true,
                    ..Default::default()
                },
                &o.message.payload,
                o.props.clone(),
            );
            // The write itself waits for room in the socket: a broker blocking its
            // publishers (a memory or disk alarm) stops reading, and the confirm
            // timeout is the bound on that too.
            let confirm = tokio::time::timeout_at(*deadline, write)
                .await
                .map_err(|_| Error::Timeout {
                    after: self.config.confirm_timeout,
                    what: format!("writing a publish to {}", self.config.redacted_url),
                })?
                .map_err(|e| map_err("publishing", e))?;
            pending.push_back((i, confirm));
        }
        while let Some((j, confirm)) = pending.pop_front() {
            self.await_confirm(topic, outgoing[j].message, confirm, *deadline)
                .await?;
            confirmed[j] = true;
            *deadline = Instant::now() + self.config.confirm_timeout;
        }
        Ok(())
    }

    /// Puts `message` in `group`'s hold queue for `delay` (rounded up to whole
    /// milliseconds, so it is never early), with the routing key a publish to `topic`
    /// would have; returns once the broker confirmed it, so the caller may ack the
    /// original. On expiry RabbitMQ dead-letters it into the group's partition queue of
    /// its key (see [`declare_delay`]). Rides out a connection loss as
    /// [`Self::publish`] does.
    pub(crate) async fn redeliver_after(
        &self,
        topic: &str,
        group: &str,
        message: Message,
        delay: Duration,
    ) -> Result<()> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let ms = delay_ms(delay)?;
        let outgoing = self.outgoing(&message)?;
        let names = GroupNames::new(topic, group);
        // The hold queue is bound to its exchange; a return means it was deleted behind
        // our back, and the caller must not ack the original.
        self.send(
            Needs::Hold { names: &names, ms },
            &names.hold(ms),
            topic,
            &[outgoing],
        )
        .await
    }

    /// Publishes `message` to `topic` for every group, no sooner than `delay` from now,
    /// through the topic's scheduled-publish cascade (see [`schedule`]): it enters at
    /// its delay's highest level with its slot in the `CC` header, and returns once the
    /// broker confirmed it there. A delay under a millisecond is an ordinary publish.
    /// Rides out a connection loss as [`Self::publish`] does.
    pub(crate) async fn schedule(
        &self,
        topic: &str,
        message: Message,
        delay: Duration,
    ) -> Result<Receipt> {
        validate_name("topic", topic)?;
        let called = Instant::now();
        if let Some(plan) = schedule::plan(delay)? {
            // Declaring levels takes the broker a while, and a level's TTL runs from when
            // the message gets there: declare first, then spell the delay that is left.
            // A failure here is left to `send`, which retries what is transient.
            let needs = Needs::Schedule {
                topic,
                levels: plan.levels,
            };
            let deadline = Instant::now() + self.config.confirm_timeout;
            let _ = tokio::time::timeout_at(deadline, self.channel_for(needs, deadline)).await;
        }
        let Some(plan) = schedule::plan(delay.saturating_sub(called.elapsed()))? else {
            let mut r = self.publish(topic, vec![message]).await?;
            return Ok(r.pop().expect("one receipt per message"));
        };
        let mut outgoing = self.outgoing(&message)?;
        outgoing.props = schedule::carry_slot(outgoing.props, &outgoing.routing_key);
        outgoing.routing_key = plan.routing_key.as_str().into();
        // The entry level's queue takes every message sent to it (its word is `y`), so
        // a return would mean the cascade was deleted behind our back.
        self.send(
            Needs::Schedule {
                topic,
                levels: plan.levels,
            },
            &schedule::level_name(topic, plan.levels - 1),
            topic,
            &[outgoing],
        )
        .await?;
        Ok(Receipt::new(message.id, None, None))
    }

    async fn await_confirm(
        &self,
        topic: &str,
        message: &Message,
        confirm: PublisherConfirm,
        deadline: Instant,
    ) -> Result<()> {
        let confirmation = match tokio::time::timeout_at(deadline, confirm).await {
            Err(_) => {
                return Err(Error::Timeout {
                    after: self.config.confirm_timeout,
                    what: format!("the broker to confirm message {}", message.id),
                })
            }
            Ok(Err(e)) => return Err(map_err("waiting for the publish confirm", e)),
            Ok(Ok(c)) => c,
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(Error::permanent(
                BACKEND,
                Unroutable {
                    topic: topic.to_string(),
                    id: message.id.clone(),
                },
            )),
            Confirmation::Nack(None) => Err(Error::transient(
                BACKEND,
                format!(
                    "the broker refused (nacked) message {} to topic {topic:?}",
                    message.id
                ),
            )),
            Confirmation::NotRequested => Err(Error::permanent(
                BACKEND,
                "publisher confirms were not enabled on the channel",
            )),
        }
    }

    pub(crate) async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some(live) = self.live.lock().await.take() {
            // Waits for outstanding confirms so nothing accepted is cut off.
            let _ = tokio::time::timeout(Duration::from_secs(5), live.channel.wait_for_confirms())
                .await;
            crate::connection::close_connection(&live.conn, "closed").await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_whole_milliseconds_within_the_ttl_limit() {
        assert_eq!(delay_ms(Duration::ZERO).unwrap(), 0);
        assert_eq!(delay_ms(Duration::from_micros(1)).unwrap(), 1);
        assert_eq!(delay_ms(Duration::from_micros(1500)).unwrap(), 2);
        assert_eq!(delay_ms(Duration::from_secs(10)).unwrap(), 10_000);
        assert_eq!(
            delay_ms(Duration::from_millis(u64::from(u32::MAX))).unwrap(),
            u64::from(u32::MAX)
        );
        let err = delay_ms(Duration::from_secs(50 * 24 * 3600)).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
    }
}
