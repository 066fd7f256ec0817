//! The requesting side: pending requests by correlation id, one inbox per broker client.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::broker::Publisher;
use crate::error::{Error, FailureKind, Result};
use crate::message::{new_id, Message};
use crate::rpc::headers;

/// Where a broker client's replies arrive: the address requests name in their
/// [`headers::REPLY_TO`] header, and the stream of messages sent to it.
///
/// A backend opens one per client, on the first request. The stream ends (or yields an
/// error) only when the inbox is gone; the requester then fails the pending requests and
/// opens a new inbox for the next one.
pub struct Inbox {
    /// The reply address, as [`Broker::send_reply`](crate::Broker::send_reply) takes it.
    pub address: String,
    /// The replies sent to the address, in any order.
    pub replies: BoxStream<'static, Result<Message>>,
}

impl Inbox {
    /// An inbox at `address` receiving `replies`.
    pub fn new(address: impl Into<String>, replies: BoxStream<'static, Result<Message>>) -> Self {
        Self {
            address: address.into(),
            replies,
        }
    }
}

/// What a pending request waits on.
type Waiter = oneshot::Sender<Result<Message>>;

/// The requests of one broker client still waiting for their replies, and its inbox.
///
/// Backends keep one as a field, create it with [`Requester::new`], and call
/// [`Requester::request`] from [`Broker::request`](crate::Broker::request) and
/// [`Requester::close`] from [`Broker::close`](crate::Broker::close). Nothing is opened
/// until the first request.
pub struct Requester {
    backend: &'static str,
    /// The open inbox; replaced when it ends. An async lock so that one first request
    /// opens it while the others wait.
    current: tokio::sync::Mutex<Option<Arc<Pending>>>,
    closed: CancellationToken,
}

/// One inbox's pending requests. `None` once the inbox ended: a request that finds it
/// so fails at once instead of waiting for a reply that cannot come.
struct Pending {
    backend: &'static str,
    address: String,
    waiters: Mutex<Option<HashMap<String, Waiter>>>,
}

impl Pending {
    fn is_open(&self) -> bool {
        self.waiters.lock().is_some()
    }

    /// Hands a reply to the request it answers; a reply nobody waits for is dropped.
    fn dispatch(&self, reply: Message) {
        let Some(correlation) = reply.headers.get(headers::CORRELATION_ID) else {
            tracing::debug!(
                address = %self.address,
                id = %reply.id,
                "a message without a correlation id reached the reply inbox; dropped"
            );
            return;
        };
        let waiter = self
            .waiters
            .lock()
            .as_mut()
            .and_then(|w| w.remove(correlation));
        match waiter {
            Some(waiter) => {
                // The request may have given up in the same instant; nothing to do then.
                let _ = waiter.send(Ok(reply));
            }
            None => tracing::debug!(
                address = %self.address,
                correlation_id = %correlation,
                "a reply came after its request ended (timed out, closed or answered); dropped"
            ),
        }
    }

    /// Ends every pending request with the error `why` makes, and refuses new ones.
    fn fail_all(&self, why: impl Fn() -> Error) {
        let waiters = self.waiters.lock().take().unwrap_or_default();
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(why()));
        }
    }
}

/// Removes a request's entry however the request ends (reply, timeout, publish error,
/// or the caller dropping the future), so the map holds only live requests.
struct Registration {
    pending: Arc<Pending>,
    correlation: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(w) = self.pending.waiters.lock().as_mut() {
            w.remove(&self.correlation);
        }
    }
}

impl Requester {
    /// A requester for the backend named `backend` (used in its errors).
    pub fn new(backend: &'static str) -> Self {
        Self {
            backend,
            current: tokio::sync::Mutex::new(None),
            closed: CancellationToken::new(),
        }
    }

    /// Sends `message` to `topic` through `publisher` with a correlation id and this
    /// client's reply address, and waits up to `timeout` for the reply. `open` opens the
    /// inbox when there is none yet (the first request, or after the last one ended).
    ///
    /// The timeout covers opening the inbox and the publish too. A reply carrying
    /// [`headers::ERROR`] becomes [`Error::ErrorReply`]; [`Requester::close`] ends the
    /// wait with [`Error::Closed`].
    pub async fn request<P, F, Fut>(
        &self,
        publisher: &P,
        open: F,
        topic: &str,
        mut message: Message,
        timeout: Duration,
    ) -> Result<Message>
    where
        P: Publisher + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Inbox>>,
    {
        if timeout.is_zero() {
            return Err(Error::config(
                "timeout",
                "must be more than zero: it is how long a request waits for its reply",
            ));
        }
        // The timeout covers the whole request: opening the inbox (a broker that
        // accepts the connection and never answers), the publish and the reply.
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        let until = |deadline: Option<tokio::time::Instant>| async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let pending = tokio::select! {
            pending = self.pending(open) => pending?,
            () = until(deadline) => {
                return Err(Error::Timeout {
                    after: timeout,
                    what: format!(
                        "opening the reply inbox for a request on topic {topic:?} (the timeout given to request)"
                    ),
                })
            }
        };
        let correlation = new_id();
        let (tx, rx) = oneshot::channel();
        match pending.waiters.lock().as_mut() {
            Some(w) => w.insert(correlation.clone(), tx),
            None => return Err(self.closed_error()),
        };
        let _registration = Registration {
            pending: pending.clone(),
            correlation: correlation.clone(),
        };
        message
            .headers
            .insert(headers::REPLY_TO.into(), pending.address.clone());
        message
            .headers
            .insert(headers::CORRELATION_ID.into(), correlation);
        let request_id = message.id.clone();
        let exchange = async {
            publisher.publish(topic, message).await?;
            // The sender is only dropped after an answer was sent; treat a drop as closed.
            rx.await.unwrap_or_else(|_| Err(self.closed_error()))
        };
        let reply = tokio::select! {
            reply = exchange => Ok(reply),
            () = until(deadline) => Err(()),
        };
        let reply = match reply {
            Ok(reply) => reply?,
            Err(()) => {
                return Err(Error::Timeout {
                    after: timeout,
                    what: format!(
                        "the reply to request {request_id} on topic {topic:?} (the timeout given to request; is a responder consuming the topic?)"
                    ),
                })
            }
        };
        match reply.headers.get(headers::ERROR) {
            None => Ok(reply),
            Some(text) => Err(Error::ErrorReply {
                topic: topic.to_string(),
                request_id,
                kind: reply
                    .headers
                    .get(headers::ERROR_KIND)
                    .map(String::as_str)
                    .and_then(FailureKind::from_name)
                    .unwrap_or(FailureKind::Permanent),
                message: text.clone(),
            }),
        }
    }

    /// Ends every pending request with [`Error::Closed`], stops reading the inbox, and
    /// makes later requests fail the same way.
    pub fn close(&self) {
        self.closed.cancel();
    }

    fn closed_error(&self) -> Error {
        Error::Closed {
            backend: self.backend,
        }
    }

    /// The open inbox's pending map, opening an inbox first if there is none.
    async fn pending<F, Fut>(&self, open: F) -> Result<Arc<Pending>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Inbox>>,
    {
        if self.closed.is_cancelled() {
            return Err(self.closed_error());
        }
        let mut current = self.current.lock().await;
        if let Some(p) = current.as_ref().filter(|p| p.is_open()) {
            return Ok(p.clone());
        }
        let inbox = open().await?;
        let pending = Arc::new(Pending {
            backend: self.backend,
            address: inbox.address,
            waiters: Mutex::new(Some(HashMap::new())),
        });
        tokio::spawn(read_inbox(
            pending.clone(),
            inbox.replies,
            self.closed.clone(),
        ));
        *current = Some(pending.clone());
        Ok(pending)
    }
}

impl Drop for Requester {
    fn drop(&mut self) {
        // Stops the inbox reader, which would otherwise keep the inbox open.
        self.closed.cancel();
    }
}

/// Hands replies to their requests until the requester closes or the inbox ends, then
/// fails whatever is still pending.
async fn read_inbox(
    pending: Arc<Pending>,
    mut replies: BoxStream<'static, Result<Message>>,
    closed: CancellationToken,
) {
    let ended = loop {
        tokio::select! {
            biased;
            _ = closed.cancelled() => break None,
            next = replies.next() => match next {
                Some(Ok(reply)) => pending.dispatch(reply),
                Some(Err(e)) => break Some(e.to_string()),
                None => break Some("the stream ended".to_string()),
            },
        }
    };
    let backend = pending.backend;
    match ended {
        None => pending.fail_all(|| Error::Closed { backend }),
        Some(why) => {
            tracing::warn!(address = %pending.address, %why, "the reply inbox ended; pending requests fail and the next request opens a new inbox");
            let address = pending.address.clone();
            pending.fail_all(|| {
                Error::transient(
                    backend,
                    format!("the reply inbox {address:?} ended before the reply came: {why}"),
                )
            });
        }
    }
}

#[cfg(test)]
#[path = "requester_tests.rs"]
mod tests;
