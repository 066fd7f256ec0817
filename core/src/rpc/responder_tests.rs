//! The replying handler: what it sends for `Ok`, for `Err`, and for a plain message.

use async_trait::async_trait;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tower::{Service, ServiceExt};

use super::*;
use crate::backend::Acker;
use crate::broker::{Capabilities, Publisher, SubscribeOptions, Subscriber, Subscription};
use crate::delivery::{Nack, Origin};
use crate::error::{FailureKind, Result};
use crate::message::Receipt;

/// Records the replies a responder sends.
#[derive(Default)]
struct Recorder(Mutex<Vec<(String, Message)>>);

#[async_trait]
impl Publisher for Recorder {
    async fn publish(&self, _topic: &str, message: Message) -> Result<Receipt> {
        Ok(Receipt::new(message.id, None, None))
    }
}

#[async_trait]
impl Subscriber for Recorder {
    async fn subscribe(&self, _options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        Err(crate::Error::config("subscribe", "not in this test"))
    }
}

#[async_trait]
impl Broker for Recorder {
    fn backend(&self) -> &'static str {
        "test"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn send_reply(&self, address: &str, reply: Message) -> Result<()> {
        self.0.lock().push((address.to_string(), reply));
        Ok(())
    }
}

struct NoAck;
impl Acker for NoAck {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn nack(&self, _: Nack) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

fn delivery(payload: &str, routed: bool) -> Delivery {
    let mut m = Message::new(payload.to_string());
    if routed {
        m = m
            .with_header(headers::REPLY_TO, "inbox-1")
            .with_header(headers::CORRELATION_ID, "c-1");
    }
    let origin = Origin::new("rates".into(), "rates".into(), None, None);
    Delivery::new(Arc::new(m), 1, origin, NoAck)
}

async fn answer(payload: Bytes) -> Result<String, HandlerError> {
    match payload.as_ref() {
        b"bad" => Err(HandlerError::permanent(std::io::Error::other(
            "no such pair",
        ))),
        other => Ok(format!("re:{}", String::from_utf8_lossy(other))),
    }
}

#[tokio::test]
async fn ok_is_the_reply_with_the_correlation_id() {
    let broker = Arc::new(Recorder::default());
    let mut service = reply_fn(broker.clone(), answer);
    let outcome = service
        .ready()
        .await
        .unwrap()
        .call(delivery("q", true))
        .await;
    assert!(outcome.is_ok());
    let sent = broker.0.lock();
    let (address, reply) = &sent[0];
    assert_eq!(address, "inbox-1");
    assert_eq!(reply.payload.as_ref(), b"re:q");
    assert_eq!(reply.headers[headers::CORRELATION_ID], "c-1");
    assert!(!reply.headers.contains_key(headers::ERROR));
}

#[tokio::test]
async fn err_is_an_error_reply_and_the_request_is_done() {
    let broker = Arc::new(Recorder::default());
    let mut service = reply_fn(broker.clone(), answer);
    let outcome = service
        .ready()
        .await
        .unwrap()
        .call(delivery("bad", true))
        .await;
    assert!(outcome.is_ok(), "answered, so acked");
    let sent = broker.0.lock();
    let (_, reply) = &sent[0];
    assert_eq!(reply.headers[headers::ERROR], "no such pair");
    assert_eq!(
        reply.headers[headers::ERROR_KIND],
        FailureKind::Permanent.as_str()
    );
    assert_eq!(reply.headers[headers::CORRELATION_ID], "c-1");
}

#[tokio::test]
async fn a_plain_message_is_handled_without_a_reply() {
    let broker = Arc::new(Recorder::default());
    let mut service = reply_fn(broker.clone(), answer);
    assert!(service
        .ready()
        .await
        .unwrap()
        .call(delivery("q", false))
        .await
        .is_ok());
    let failed = service
        .ready()
        .await
        .unwrap()
        .call(delivery("bad", false))
        .await;
    assert_eq!(
        failed.unwrap_err().kind(),
        FailureKind::Permanent,
        "fails as any handler"
    );
    assert!(broker.0.lock().is_empty());
}
