//! Request/reply through RabbitMQ's direct reply-to.
//!
//! A broker client asks on one connection of its own (`<connection_name> rpc`), on one
//! confirm-mode channel that consumes the pseudo-queue `amq.rabbitmq.reply-to` (no-ack)
//! and publishes the requests with `reply_to = amq.rabbitmq.reply-to`: the broker
//! rewrites that to an address naming this channel, so replies reach this client only,
//! with no queue to declare or clean up. Replies go out on a second channel of the same
//! connection, to the default exchange with the reply address as routing key, so a
//! reply that fails (a bad address closes its channel) never disturbs pending requests.
//!
//! Why direct reply-to and not an exclusive reply queue: no queue per client (the
//! broker's file-handle budget stays with the application's groups), no declare before
//! the first request, and nothing left behind by a client that dies. Its limits suit
//! request/reply: a reply is delivered only while the asking channel lives (a reply to a
//! requester that went away is dropped by the broker), and requests must be published
//! on the consuming channel, which is why requests do not go through the shared
//! publisher.
//!
//! Requests are transient (`delivery_mode = 1`) and carry the request's timeout as their
//! `expiration`: a request nobody took in time is dropped by the broker instead of
//! being answered after its requester gave up. Routing is as for a publish (the key's
//! slot, or round-robin), not mandatory: a request no group takes is a timeout, as on
//! every backend.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use switchyard_core::backend::rpc::{Inbox, Requester};
use switchyard_core::backend::validate_name;
use switchyard_core::{Error, Message, Publisher, Receipt, Result};
use tokio::sync::Mutex;

use crate::codec::{decode, properties};
use crate::config::RabbitConfig;
use crate::connection::connect_once;
use crate::error::map_err;
use crate::topology::{declare_topic, key_hash, slot_routing_keys, SLOTS};
use crate::BACKEND;

/// The pseudo-queue a requester consumes, and the `reply_to` its requests carry.
pub(crate) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The prefix of every address a reply may go to. Only the broker names queues so
/// (direct reply-to addresses, and server-named queues such as the exclusive reply
/// queue of RabbitMQ's RPC pattern), so a forged reply address cannot make a responder
/// publish into an application's queue.
pub(crate) const REPLY_ADDRESS_PREFIX: &str = "amq.";

/// A broker client's request/reply state: its pending requests, and the connection
/// they and its replies travel on, opened on first use.
pub(crate) struct Rpc {
    config: Arc<RabbitConfig>,
    requester: Requester,
    link: Mutex<Link>,
    routing: Vec<ShortString>,
    next_slot: AtomicU64,
    closed: AtomicBool,
}

/// The connection and its two channels; each is rebuilt when found dead.
#[derive(Default)]
struct Link {
    conn: Option<Connection>,
    /// Consumes direct reply-to and publishes the requests (confirms on).
    requests: Option<Arc<Channel>>,
    /// Publishes the replies this client sends as a responder (confirms on).
    replies: Option<Arc<Channel>>,
    /// Topics whose exchange this connection declared.
    declared: HashSet<String>,
}

impl Rpc {
    pub(crate) fn new(config: Arc<RabbitConfig>) -> Self {
        Self {
            config,
            requester: Requester::new(BACKEND),
            link: Mutex::new(Link::default()),
            routing: slot_routing_keys(),
            next_slot: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Publishes `message` to `topic` as a request and waits for its reply (see
    /// [`Requester::request`]).
    pub(crate) async fn request(
        &self,
        topic: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<Message> {
        let publisher = Requests { rpc: self, timeout };
        self.requester
            .request(&publisher, || self.open_inbox(), topic, message, timeout)
            .await
    }

    /// Sends `reply` to `address` through the default exchange, and returns once the
    /// broker confirmed it. The address must be one the broker named (see
    /// [`REPLY_ADDRESS_PREFIX`]). A reply to a requester that is gone is dropped by the
    /// broker, as nobody waits for it.
    pub(crate) async fn send_reply(&self, address: &str, reply: Message) -> Result<()> {
        if !address.starts_with(REPLY_ADDRESS_PREFIX) {
            return Err(Error::config(
                "reply address",
                format!(
                    "{address:?} is not a RabbitMQ reply address (a direct reply-to address or a server-named queue, both starting with {REPLY_ADDRESS_PREFIX:?}): the request's reply_to names a queue the broker did not name, so no reply goes there"
                ),
            ));
        }
        let routing_key = ShortString::try_new(address)
            .map_err(|_| Error::config("reply address", "longer than 255 bytes"))?;
        let props = properties(&reply)?.with_delivery_mode(1);
        let channel = {
            let mut link = self.link.lock().await;
            let live = link.replies.as_ref().filter(|c| c.status().connected());
            match live.cloned() {
                Some(c) => c,
                None => {
                    let conn = self.connection(&mut link).await?;
                    let c = confirm_channel(conn, "the reply channel").await?;
                    link.replies = Some(c.clone());
                    c
                }
            }
        };
        let confirm = channel
            .basic_publish(
                "".into(),
                routing_key,
                BasicPublishOptions::default(),
                &reply.payload,
                props,
            )
            .await
            .map_err(|e| map_err("publishing a reply", e))?;
        settled(confirm.await, || format!("the reply to {address:?}"))
    }

    /// Ends every pending request with [`Error::Closed`], refuses new ones, and closes
    /// the connection.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Before the connection goes, so pending requests end as closed, not as lost.
        self.requester.close();
        let conn = self.link.lock().await.conn.take();
        if let Some(conn) = conn {
            crate::connection::close_connection(&conn, "closed").await;
        }
    }

    /// The live connection, opened (again) when there is none; a new connection
    /// starts with no channels and nothing declared.
    async fn connection<'l>(&self, link: &'l mut Link) -> Result<&'l Connection> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { backend: BACKEND });
        }
        if !link.conn.as_ref().is_some_and(|c| c.status().connected()) {
            if let Some(old) = link.conn.take() {
                crate::connection::close_connection(&old, "reconnecting").await;
            }
            let conn = connect_once(&self.config, "rpc").await?;
            *link = Link {
                conn: Some(conn),
                ..Link::default()
            };
        }
        Ok(link.conn.as_ref().expect("connected above"))
    }

    /// Opens the inbox: a new requests channel consuming direct reply-to. Called by the
    /// requester on the first request, and again after the inbox ended (its channel or
    /// connection was lost, which failed the requests then pending).
    async fn open_inbox(&self) -> Result<Inbox> {
        let mut link = self.link.lock().await;
        if let Some(old) = link.requests.take() {
            crate::connection::close_channel(&old, "replaced").await;
        }
        let conn = self.connection(&mut link).await?;
        let channel = confirm_channel(conn, "the request channel").await?;
        let consumer = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "switchyard-replies".into(),
                BasicConsumeOptions {
                    // Direct reply-to takes no acks: a reply is worth one look.
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err("consuming direct reply-to", e))?;
        link.requests = Some(channel);
        let replies = consumer
            .map(|item| match item {
                Ok(d) => Ok(Arc::unwrap_or_clone(decode(&d.properties, d.data))),
                Err(e) => Err(map_err("receiving replies", e)),
            })
            .boxed();
        Ok(Inbox::new(DIRECT_REPLY_TO, replies))
    }

    /// The requests channel and the connection it is on, declaring `topic`'s exchange
    /// first if this connection has not yet. An inbox that is gone is a transient
    /// error: requests published elsewhere could not be answered.
    async fn request_channel(&self, topic: &str) -> Result<Arc<Channel>> {
        let mut link = self.link.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { backend: BACKEND });
        }
        let (Some(conn), Some(channel)) = (&link.conn, &link.requests) else {
            return Err(inbox_lost());
        };
        if !channel.status().connected() {
            return Err(inbox_lost());
        }
        let channel = channel.clone();
        if !link.declared.contains(topic) {
            // A publish to a missing exchange would close the channel, and the inbox with it.
            declare_topic(conn, topic).await?;
            link.declared.insert(topic.to_string());
        }
        Ok(channel)
    }

    fn routing_key(&self, message: &Message) -> ShortString {
        let slot = match &message.key {
            Some(k) => key_hash(k) % u64::from(SLOTS),
            None => self.next_slot.fetch_add(1, Ordering::Relaxed) % u64::from(SLOTS),
        };
        self.routing[slot as usize].clone()
    }
}

/// Publishes requests on the inbox's channel, for [`Requester::request`].
struct Requests<'a> {
    rpc: &'a Rpc,
    /// The request's timeout, which becomes its `expiration`.
    timeout: Duration,
}

#[async_trait]
impl Publisher for Requests<'_> {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        validate_name("topic", topic)?;
        let limit = self.rpc.config.max_message_size;
        if message.payload.len() > limit {
            return Err(Error::MessageTooLarge {
                id: message.id.clone(),
                size: message.payload.len(),
                limit,
                backend: BACKEND,
            });
        }
        let props = request_properties(&message, self.timeout)?;
        let routing_key = self.rpc.routing_key(&message);
        let channel = self.rpc.request_channel(topic).await?;
        let confirm = channel
            .basic_publish(
                topic.into(),
                routing_key,
                BasicPublishOptions::default(),
                &message.payload,
                props,
            )
            .await
            .map_err(|e| map_err("publishing a request", e))?;
        settled(confirm.await, || format!("request {}", message.id))?;
        Ok(Receipt::new(message.id, None, None))
    }
}

/// A request's properties: as a publish's, transient, expiring with its timeout
/// (whole milliseconds, rounded up, at least 1).
fn request_properties(message: &Message, timeout: Duration) -> Result<BasicProperties> {
    let ms = timeout
        .as_nanos()
        .div_ceil(1_000_000)
        .clamp(1, u128::from(u32::MAX));
    Ok(properties(message)?
        .with_delivery_mode(1)
        .with_expiration(ms.to_string().into()))
}

/// A new channel with publisher confirms on. Shared behind an `Arc`: a lapin `Channel`
/// clone copies a dozen handles, and every request and reply takes the channel.
async fn confirm_channel(conn: &Connection, what: &str) -> Result<Arc<Channel>> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| map_err(&format!("opening {what}"), e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| map_err(&format!("enabling confirms on {what}"), e))?;
    Ok(Arc::new(channel))
}

/// The outcome of a publisher confirm for `what`.
fn settled(confirmation: lapin::Result<Confirmation>, what: impl FnOnce() -> String) -> Result<()> {
    match confirmation {
        Ok(Confirmation::Ack(_)) => Ok(()),
        Ok(Confirmation::Nack(_)) => Err(Error::transient(
            BACKEND,
            format!("the broker refused (nacked) {}", what()),
        )),
        Ok(Confirmation::NotRequested) => Err(Error::permanent(
            BACKEND,
            "publisher confirms were not enabled on the channel",
        )),
        Err(e) => Err(map_err(
            &format!("waiting for the confirm of {}", what()),
            e,
        )),
    }
}

fn inbox_lost() -> Error {
    Error::transient(
        BACKEND,
        "the reply channel closed (connection lost); the next request opens a new one",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_expire_with_their_timeout_and_are_transient() {
        let m = Message::new("q");
        let props = request_properties(&m, Duration::from_micros(1500)).unwrap();
        assert_eq!(props.expiration().as_ref().unwrap().as_str(), "2");
        assert_eq!(*props.delivery_mode(), Some(1));
        let props = request_properties(&m, Duration::from_secs(86_400 * 60)).unwrap();
        assert_eq!(
            props.expiration().as_ref().unwrap().as_str(),
            u32::MAX.to_string()
        );
    }
}
