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
use crate::topology::{declare_exchange, key_hash, map_err, slot_routing_keys, SLOTS};
use crate::BACKEND;

/// How many publishes may wait for their confirm at once in a batch; bounds memory while
/// keeping the pipe full.
const CONFIRM_WINDOW: usize = 4096;

struct Live {
    conn: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

pub(crate) struct PublisherCore {
    config: Arc<RabbitConfig>,
    live: Mutex<Option<Live>>,
    routing: Vec<ShortString>,
    next_slot: AtomicU64,
    closed: std::sync::atomic::AtomicBool,
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

    /// A live channel with confirms on and the topic's exchange declared.
    async fn channel_for(&self, topic: &str) -> Result<Channel> {
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
        if !l.declared.contains(topic) {
            declare_exchange(&l.conn, topic).await?;
            l.declared.insert(topic.to_string());
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
        let channel = self.channel_for(topic).await?;
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
