//! Request/reply in process: the requester's inbox is a channel, and a reply goes
//! straight into it instead of across a reply topic.

use futures::StreamExt;
use parking_lot::Mutex;
use switchyard_core::backend::rpc::pubsub::new_reply_topic;
use switchyard_core::backend::rpc::Inbox;
use switchyard_core::{Error, Message, Result};

use crate::broker::BACKEND;
use tokio::sync::mpsc;

/// Replies queued for the requester's reader before a responder waits for room.
const CAPACITY: usize = 4096;

/// The broker's one open inbox: its address and the sending side of its channel.
#[derive(Default)]
pub(crate) struct Replies {
    open: Mutex<Option<(String, mpsc::Sender<Result<Message>>)>>,
}

impl Replies {
    /// A new inbox, replacing the previous one (the requester opens another only when
    /// the previous one is gone).
    pub(crate) fn open(&self) -> Inbox {
        let address = new_reply_topic();
        let (tx, rx) = mpsc::channel(CAPACITY);
        *self.open.lock() = Some((address.clone(), tx));
        Inbox::new(address, stream(rx))
    }

    /// Hands `reply` to the inbox at `address`; an address that is not this broker's
    /// open inbox (forged, or from before a close) is refused, so the responder logs it.
    pub(crate) async fn send(&self, address: &str, reply: Message) -> Result<()> {
        let tx = match &*self.open.lock() {
            Some((open, tx)) if open == address => tx.clone(),
            _ => {
                return Err(Error::config(
                    "reply address",
                    format!("{address:?} is not an open reply inbox of this memory broker"),
                ))
            }
        };
        // A closed inbox means its requester is gone: the reply has nobody to reach, now
        // or on a retry, so the error is permanent (the responder drops the reply
        // rather than run the request again and again).
        tx.send(Ok(reply)).await.map_err(|_| {
            Error::permanent(
                BACKEND,
                format!("the reply inbox {address:?} is closed (its requester has closed); reply dropped"),
            )
        })
    }
}

/// The receiving side as the stream an [`Inbox`] holds.
fn stream(
    rx: mpsc::Receiver<Result<Message>>,
) -> futures::stream::BoxStream<'static, Result<Message>> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) }).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reply_to_a_closed_inbox_is_refused_for_good() {
        let replies = Replies::default();
        let inbox = replies.open();
        let address = inbox.address.clone();
        drop(inbox);
        let err = replies
            .send(&address, Message::new("late"))
            .await
            .unwrap_err();
        assert!(
            !err.is_transient(),
            "a retry would run the request again: {err}"
        );
    }
}
