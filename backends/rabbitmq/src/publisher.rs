//! Publishing: one connection and one confirm-mode channel per broker handle, rebuilt
//! after a connection loss.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};
use switchyard_core::{validate_name, Error, Message, Receipt, Result};
use tokio::sync::Mutex;

use crate::codec::properties;
use crate::config::RabbitConfig;
use crate::connection::connect_with_retry;
use crate::topology::{
    declare_delay, declare_exchange, key_hash, map_err, slot_routing_keys, GroupNames, SLOTS,
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
}

/// What a publish needs declared before it goes out.
enum Needs<'a> {
    /// The topic's exchange.
    Topic(&'a str),
    /// A group's hold queue for one delay, and what it dead-letters into.
    Hold { names: &'a GroupNames, ms: u64 },
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

    /// A live channel with confirms on and what `needs` declared.
    async fn channel_for(&self, needs: Needs<'_>) -> Result<Channel> {
        let mut live = self.live.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { backend: BACKEND });
        }
        let healthy = live
            .as_ref()
            .is_some_and(|l| l.conn.status().connected() && l.channel.status().connected());
        if !healthy {
            if let Some(old) = live.take() {
                let _ = old.conn.close(200, "reconnecting".into()).await;
            }
            let conn = connect_with_retry(&self.config, "publisher").await?;
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
            });
        }
        let l = live.as_mut().expect("connected above");
        match needs {
            Needs::Topic(topic) => {
                if !l.declared.contains(topic) {
                    declare_exchange(&l.conn, topic).await?;
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
        }
        Ok(l.channel.clone())
    }

    fn routing_key(&self, message: &Message) -> ShortString {
        let slot = match &message.key {
            Some(k) => key_hash(k) as usize % SLOTS,
            // Unkeyed messages go round-robin over the slots, so over every partition.
            None => self.next_slot.fetch_add(1, Ordering::Relaxed) as usize % SLOTS,
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

    pub(crate) async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Receipt>> {
        validate_name("topic", topic)?;
        let mut prepared = Vec::with_capacity(messages.len());
        for m in &messages {
            self.check(m)?;
            prepared.push((properties(m)?, self.routing_key(m)));
        }
        let channel = self.channel_for(Needs::Topic(topic)).await?;
        let exchange = ShortString::from(topic);
        let mut pending: VecDeque<(usize, PublisherConfirm)> = VecDeque::new();
        let result = async {
            for (i, (m, (props, rk))) in messages.iter().zip(prepared).enumerate() {
                if pending.len() >= CONFIRM_WINDOW {
                    let (j, confirm) = pending.pop_front().expect("non-empty");
                    self.await_confirm(topic, &messages[j], confirm).await?;
                }
                let confirm = channel
                    .basic_publish(
                        exchange.clone(),
                        rk,
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &m.payload,
                        props,
                    )
                    .await
                    .map_err(|e| map_err("publishing", e))?;
                pending.push_back((i, confirm));
            }
            while let Some((j, confirm)) = pending.pop_front() {
                self.await_confirm(topic, &messages[j], confirm).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        // A dead channel is noticed and rebuilt by the next publish.
        result?;
        Ok(messages
            .into_iter()
            .map(|m| Receipt::new(m.id, None, None))
            .collect())
    }

    /// Puts `message` in `group`'s hold queue for `delay` (rounded up to whole
    /// milliseconds, so it is never early), with the routing key a publish to `topic`
    /// would have; returns once the broker confirmed it, so the caller may ack the
    /// original. On expiry RabbitMQ dead-letters it into the group's partition queue of
    /// its key (see [`declare_delay`]).
    pub(crate) async fn redeliver_after(
        &self,
        topic: &str,
        group: &str,
        message: Message,
        delay: Duration,
    ) -> Result<()> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.check(&message)?;
        let ms = delay_ms(delay)?;
        let props = properties(&message)?;
        let rk = self.routing_key(&message);
        let names = GroupNames::new(topic, group);
        let channel = self.channel_for(Needs::Hold { names: &names, ms }).await?;
        let hold = names.hold(ms);
        let confirm = channel
            .basic_publish(
                hold.as_str().into(),
                rk,
                BasicPublishOptions {
                    // The hold queue is bound to its exchange; a return means it was
                    // deleted behind our back, and the caller must not ack the original.
                    mandatory: true,
                    ..Default::default()
                },
                &message.payload,
                props,
            )
            .await
            .map_err(|e| map_err("publishing a delayed redelivery", e))?;
        self.await_confirm(topic, &message, confirm).await
    }

    async fn await_confirm(
        &self,
        topic: &str,
        message: &Message,
        confirm: PublisherConfirm,
    ) -> Result<()> {
        let after = self.config.confirm_timeout;
        let confirmation = match tokio::time::timeout(after, confirm).await {
            Err(_) => {
                return Err(Error::Timeout {
                    after,
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
            let _ = live.conn.close(200, "closed".into()).await;
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
