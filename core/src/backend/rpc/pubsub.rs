//! A reply transport over plain publish/subscribe, for any backend.
//!
//! Each broker client gets its own reply topic, `sy.reply.<random>`, read by an
//! ephemeral group of the same name, so replies reach the requesting client only and the
//! group's broker state goes away when the client does. A reply is a publish to that
//! topic. A new backend can use it as it is; one with a cheaper per-process channel
//! (memory: a channel in process; Kafka: a partition read by assignment; RabbitMQ:
//! direct reply-to) supplies its own [`Inbox`] and overrides
//! [`Broker::send_reply`](crate::Broker::send_reply).

use futures::StreamExt;

use super::Inbox;
use crate::broker::{Publisher, SubscribeOptions, Subscriber};
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::message::{new_id, Message};

/// The prefix of every reply topic. A reply goes only to a topic with it, so a forged
/// reply address cannot make a responder publish into an application's topic.
pub const REPLY_TOPIC_PREFIX: &str = "sy.reply.";

/// A fresh reply topic name: [`REPLY_TOPIC_PREFIX`] and the random tail of a new id
/// (its head is the clock, shared by clients made together).
pub fn new_reply_topic() -> String {
    format!("{REPLY_TOPIC_PREFIX}{}", &new_id().replace('-', "")[12..])
}

/// How many replies the inbox takes from the subscription at once.
const BATCH: usize = 256;

/// Subscribes a new ephemeral group to a new reply topic and returns it as an inbox.
/// Each reply is acked as it is taken: a reply is worth one look, by this client only.
pub async fn open_inbox<S: Subscriber + ?Sized>(subscriber: &S) -> Result<Inbox> {
    let address = new_reply_topic();
    let subscription = subscriber
        .subscribe(SubscribeOptions::queue(&address).ephemeral(true))
        .await?;
    let replies = futures::stream::unfold(
        (subscription, Vec::<Delivery>::with_capacity(BATCH)),
        |(mut subscription, mut buf)| async move {
            let batch = match subscription.recv_many(&mut buf, BATCH).await {
                Ok(0) => return None,
                Ok(_) => {
                    let mut batch = Vec::with_capacity(buf.len());
                    for delivery in buf.drain(..) {
                        let acked = delivery.ack().await;
                        batch.push(acked.map(|()| delivery.message().clone()));
                    }
                    batch
                }
                Err(e) => vec![Err(e)],
            };
            Some((futures::stream::iter(batch), (subscription, buf)))
        },
    )
    .flatten()
    .boxed();
    Ok(Inbox::new(address, replies))
}

/// Publishes `reply` to the reply topic `address` through `publisher`; an address that
/// is not a reply topic is a configuration error (see [`REPLY_TOPIC_PREFIX`]).
pub async fn send_reply<P: Publisher + ?Sized>(
    publisher: &P,
    address: &str,
    reply: Message,
) -> Result<()> {
    if !address.starts_with(REPLY_TOPIC_PREFIX) {
        return Err(Error::config(
            "reply address",
            format!(
                "{address:?} is not a reply topic (they start with {REPLY_TOPIC_PREFIX:?}); the request's x-reply-to header was not written by a switchyard requester on this backend"
            ),
        ));
    }
    publisher.publish(address, reply).await.map(drop)
}
