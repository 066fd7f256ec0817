//! A received message, where it came from, and its one-shot ack handle.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::error::{Error, Result};
use crate::message::Message;

/// What to do with a message that was not handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Nack {
    /// Deliver it again (delivery count + 1). Later messages with the same key wait for it.
    Requeue,
    /// Give it up: the broker drops it, or dead-letters it where the backend is set up to.
    Reject,
}

/// Where a delivery came from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Origin {
    /// The topic it was published to.
    pub topic: Arc<str>,
    /// The group that received it.
    pub group: Arc<str>,
    /// The partition, where the backend has partitions.
    pub partition: Option<i32>,
    /// The offset (or log position), where the backend has one.
    pub offset: Option<i64>,
}

impl Origin {
    /// An origin; backends build these.
    pub fn new(
        topic: Arc<str>,
        group: Arc<str>,
        partition: Option<i32>,
        offset: Option<i64>,
    ) -> Self {
        Self {
            topic,
            group,
            partition,
            offset,
        }
    }
}

/// How a backend settles one delivery. Implemented by backends, called through
/// [`Delivery::ack`] and [`Delivery::nack`], which guarantee it is called at most once.
pub trait Acker: Send + Sync + 'static {
    /// The message was handled: the broker may forget it for this group.
    fn ack(&self) -> BoxFuture<'_, Result<()>>;
    /// The message was not handled.
    fn nack(&self, action: Nack) -> BoxFuture<'_, Result<()>>;
    /// Every handle to the delivery was dropped without settling it. Backends that can
    /// should return the message for redelivery here, so a forgotten delivery is not lost.
    fn dropped_unsettled(&self) {}
}

const UNSETTLED: u8 = 0;
const SETTLING: u8 = 1;
const ACKED: u8 = 2;
const NACKED: u8 = 3;

/// Everything a delivery holds, behind one `Arc`, so a clone is one atomic increment.
struct Inner<A: ?Sized + Acker> {
    message: Arc<Message>,
    delivery_count: u32,
    origin: Origin,
    state: AtomicU8,
    acker: A,
}

impl<A: ?Sized + Acker> Drop for Inner<A> {
    fn drop(&mut self) {
        if *self.state.get_mut() == UNSETTLED {
            self.acker.dropped_unsettled();
        }
    }
}

/// A message as a consumer receives it.
///
/// Cheap to clone (the message and the ack handle are shared), so middleware such as
/// retry can hold on to it. Settle it once: a second [`ack`](Delivery::ack) or
/// [`nack`](Delivery::nack) returns [`Error::AlreadySettled`]. The consumer runtime acks
/// after the handler succeeds and nacks when it fails, unless the handler settled it.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner<dyn Acker>>,
}

impl Delivery {
    /// Builds a delivery; called by backends.
    pub fn new(
        message: Arc<Message>,
        delivery_count: u32,
        origin: Origin,
        acker: impl Acker,
    ) -> Self {
        let inner: Arc<Inner<dyn Acker>> = Arc::new(Inner {
            message,
            delivery_count: delivery_count.max(1),
            origin,
            state: AtomicU8::new(UNSETTLED),
            acker,
        });
        Self { inner }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.inner.message
    }

    /// The message, shared (for the `Arc<Message>` handler argument).
    pub(crate) fn message_arc(&self) -> &Arc<Message> {
        &self.inner.message
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.inner.message.id
    }

    /// The ordering key.
    pub fn key(&self) -> Option<&str> {
        self.inner.message.key.as_deref()
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.inner.message.payload
    }

    /// Which delivery of the message this is: 1 on the first, then one more on each
    /// redelivery (the handler's runs within one delivery are attempts, counted by the
    /// retry middleware).
    pub fn delivery_count(&self) -> u32 {
        self.inner.delivery_count
    }

    /// Where the message came from.
    pub fn origin(&self) -> &Origin {
        &self.inner.origin
    }

    /// The topic it came from.
    pub fn topic(&self) -> &str {
        &self.inner.origin.topic
    }

    /// The group that received it.
    pub fn group(&self) -> &str {
        &self.inner.origin.group
    }

    /// Whether it was acked or nacked already.
    pub fn is_settled(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) != UNSETTLED
    }

    /// Acknowledges the message: it was handled. Errors if already settled.
    pub async fn ack(&self) -> Result<()> {
        self.settle(ACKED, |a| a.ack()).await
    }

    /// Negatively acknowledges the message. Errors if already settled.
    pub async fn nack(&self, action: Nack) -> Result<()> {
        self.settle(NACKED, |a| a.nack(action)).await
    }

    /// Claims the right to settle: only one caller moves the state off `UNSETTLED`.
    fn begin_settle(&self) -> Result<()> {
        self.inner
            .state
            .compare_exchange(UNSETTLED, SETTLING, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(|state| Error::AlreadySettled {
                id: self.inner.message.id.clone(),
                state: match state {
                    NACKED => "nacked",
                    SETTLING => "being settled",
                    _ => "acked",
                },
            })
    }

    async fn settle<'a>(
        &'a self,
        target: u8,
        op: impl FnOnce(&'a dyn Acker) -> BoxFuture<'a, Result<()>>,
    ) -> Result<()> {
        self.begin_settle()?;
        // Only the caller that won the state change reaches the backend.
        let result = op(&self.inner.acker).await;
        // A failed settle leaves the delivery open, so the caller may try again or nack.
        let next = if result.is_ok() { target } else { UNSETTLED };
        self.inner.state.store(next, Ordering::Release);
        result
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.inner.message.id)
            .field("key", &self.inner.message.key)
            .field("delivery_count", &self.inner.delivery_count)
            .field("origin", self.origin())
            .field("payload_len", &self.inner.message.payload.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Clone, Default)]
    struct Counting(Arc<AtomicUsize>, Arc<AtomicUsize>);

    impl Acker for Counting {
        fn ack(&self) -> BoxFuture<'_, Result<()>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn nack(&self, _: Nack) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn dropped_unsettled(&self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn delivery(acker: Counting) -> Delivery {
        let origin = Origin::new("t".into(), "g".into(), None, None);
        Delivery::new(Arc::new(Message::new("x")), 1, origin, acker)
    }

    #[tokio::test]
    async fn second_ack_is_a_typed_error() {
        let acker = Counting::default();
        let d = delivery(acker.clone());
        d.ack().await.unwrap();
        let err = d.clone().ack().await.unwrap_err();
        assert!(
            matches!(err, Error::AlreadySettled { state: "acked", .. }),
            "{err}"
        );
        let err = d.nack(Nack::Requeue).await.unwrap_err();
        assert!(matches!(err, Error::AlreadySettled { .. }), "{err}");
        assert_eq!(acker.0.load(Ordering::SeqCst), 1);
        drop(d);
        assert_eq!(
            acker.1.load(Ordering::SeqCst),
            0,
            "settled deliveries are not returned on drop"
        );
    }

    #[tokio::test]
    async fn dropping_unsettled_tells_the_backend() {
        let acker = Counting::default();
        let d = delivery(acker.clone());
        let copy = d.clone();
        drop(d);
        assert_eq!(acker.1.load(Ordering::SeqCst), 0, "a clone is still alive");
        drop(copy);
        assert_eq!(acker.1.load(Ordering::SeqCst), 1);
    }
}
