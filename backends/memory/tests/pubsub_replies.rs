//! The generic request/reply transport (`switchyard_core::backend::rpc::pubsub`: a reply
//! topic per client read by an ephemeral group) works end to end over a broker's plain
//! publish/subscribe. A backend without a channel of its own uses it as it is; here it
//! runs over the memory broker's topics, bypassing memory's in-process inbox.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::backend::rpc::{pubsub, Requester};
use switchyard_core::{
    reply_fn, Broker, CancellationToken, Capabilities, Consumer, Delivery, HandlerError, Message,
    Publisher, Receipt, Result, SubscribeOptions, Subscriber, Subscription,
};
use switchyard_memory::MemoryBroker;

/// A broker that has only publish/subscribe, and request/reply through the generic
/// transport (the default `send_reply` publishes to the reply topic).
struct TopicsOnly {
    inner: MemoryBroker,
    requester: Requester,
}

#[async_trait]
impl Publisher for TopicsOnly {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        self.inner.publish(topic, message).await
    }
}

#[async_trait]
impl Subscriber for TopicsOnly {
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        self.inner.subscribe(options).await
    }
}

#[async_trait]
impl Broker for TopicsOnly {
    fn backend(&self) -> &'static str {
        "topics-only"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            request_reply: true,
            ..Default::default()
        }
    }
    async fn close(&self) -> Result<()> {
        self.requester.close();
        Ok(())
    }
    async fn request(&self, topic: &str, message: Message, timeout: Duration) -> Result<Message> {
        self.requester
            .request(self, || pubsub::open_inbox(self), topic, message, timeout)
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_cross_a_reply_topic_and_each_reaches_its_request() {
    let broker = Arc::new(TopicsOnly {
        inner: MemoryBroker::new(),
        requester: Requester::new("topics-only"),
    });
    let shutdown = CancellationToken::new();
    let echo = |delivery: Delivery| async move {
        Ok::<_, HandlerError>(delivery.message().payload.clone())
    };
    let responder = Consumer::new(
        SubscribeOptions::new("questions", "answer"),
        reply_fn(broker.clone(), echo),
    );
    let running = tokio::spawn(responder.run(broker.clone(), shutdown.clone()));
    let asks = (0..200).map(|n| {
        let broker = broker.clone();
        async move {
            let reply = broker
                .request(
                    "questions",
                    Message::new(format!("q{n}")),
                    Duration::from_secs(10),
                )
                .await?;
            Ok::<_, switchyard_core::Error>((n, reply))
        }
    });
    for outcome in futures::future::join_all(asks).await {
        let (n, reply) = outcome.expect("every request gets its reply");
        assert_eq!(
            reply.payload,
            format!("q{n}").as_bytes(),
            "a reply matched to the wrong request"
        );
    }
    // The replies crossed a reply topic of the generic transport, not memory's channel.
    let topics = broker.inner.topics().await.unwrap();
    assert!(
        topics
            .iter()
            .any(|t| t.name.starts_with(pubsub::REPLY_TOPIC_PREFIX)),
        "no reply topic among {:?}",
        topics.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    broker.close().await.unwrap();
    shutdown.cancel();
    running.await.unwrap().unwrap();
}
