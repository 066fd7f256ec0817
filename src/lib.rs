//! # switchyard
//!
//! One set of traits for message queues, with the broker underneath picked by a Cargo
//! feature and a URL: in-memory (`memory`, default), Apache Kafka (`kafka`) or RabbitMQ
//! (`rabbitmq`).
//!
//! | pattern | switchyard |
//! |---|---|
//! | publish-subscribe | one [`SubscribeOptions::new`]`(topic, group)` per service |
//! | competing consumers | the same group subscribed several times ([`Consumer::members`]) |
//! | point-to-point queue | [`SubscribeOptions::queue`]`(name)` |
//! | key-based ordering | [`Message::with_key`]: same key, one at a time, in order |
//! | commit after processing | the runtime acks only after the handler succeeds |
//! | request/reply | [`Broker::request`] or [`RequestExt::request_json`], answered by a [`reply_fn`] handler |
//!
//! ```
//! use switchyard::{App, Consumer, HandlerError, Json, PublisherExt, SubscribeOptions};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderCreated { order: u64, customer: String }
//!
//! async fn email(Json(order): Json<OrderCreated>) -> Result<(), HandlerError> {
//!     println!("mail for order {}", order.order);
//!     Ok(())
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let broker = switchyard::connect("memory://doc").await?;
//! broker
//!     .publish_json("orders", Some("customer-1"), &OrderCreated { order: 1, customer: "customer-1".into() })
//!     .await?;
//! let shutdown = switchyard::CancellationToken::new();
//! let app = App::new(broker.clone())
//!     .consumer(Consumer::handler(SubscribeOptions::new("orders", "email"), email).concurrency(8));
//! # shutdown.cancel();
//! let reports = app.run(shutdown).await?;
//! # let _ = reports;
//! # Ok::<_, switchyard::Error>(()) }).unwrap();
//! ```
//!
//! A crate that adds a broker finds what it needs beyond this in [`backend`].
#![forbid(unsafe_code)]
// docs.rs (nightly) marks feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

pub use switchyard_core::*;

/// Middleware layers (`tower`).
pub use switchyard_middleware as middleware;

/// The in-memory backend.
#[cfg(feature = "memory")]
pub use switchyard_memory as memory;

/// The Kafka backend.
#[cfg(feature = "kafka")]
pub use switchyard_kafka as kafka;

/// The RabbitMQ backend.
#[cfg(feature = "rabbitmq")]
pub use switchyard_rabbitmq as rabbitmq;

/// Connects to the broker a URL names, with the backends compiled in:
///
/// - `memory://[name][?capacity=N&publish_timeout_ms=N&max_message_size=N]`
/// - `kafka://host:port[,host:port][?librdkafka.setting=value]` (feature `kafka`)
/// - `amqp://user:pass@host:port/vhost`, `amqps://…` (feature `rabbitmq`)
///
/// A scheme whose backend is not compiled in is [`Error::BackendNotCompiled`], naming
/// the feature to enable; an unknown scheme is [`Error::UnknownScheme`]. The broker is
/// wrapped in [`Instrumented`] (trace context, spans, counters: see [`observe`]).
pub async fn connect(url: &str) -> Result<AnyBroker> {
    let parsed = backend::BrokerUrl::parse(url)?;
    match parsed.scheme.as_str() {
        "memory" => {
            #[cfg(feature = "memory")]
            {
                Ok(instrument(std::sync::Arc::new(
                    memory::MemoryBroker::connect(url)?,
                )))
            }
            #[cfg(not(feature = "memory"))]
            {
                Err(not_compiled("memory", "memory"))
            }
        }
        "kafka" => {
            #[cfg(feature = "kafka")]
            {
                kafka::connect(url).await.map(instrument)
            }
            #[cfg(not(feature = "kafka"))]
            {
                Err(not_compiled("kafka", "kafka"))
            }
        }
        "amqp" | "amqps" => {
            #[cfg(feature = "rabbitmq")]
            {
                rabbitmq::connect(url).await.map(instrument)
            }
            #[cfg(not(feature = "rabbitmq"))]
            {
                Err(not_compiled(&parsed.scheme, "rabbitmq"))
            }
        }
        other => Err(Error::UnknownScheme {
            scheme: other.to_string(),
            url: backend::redact(url),
        }),
    }
}

/// Every broker from [`connect`] publishes through [`Instrumented`]: `traceparent`
/// stamping, `publish` spans and counters, the same for every backend.
#[allow(dead_code)]
fn instrument(broker: AnyBroker) -> AnyBroker {
    std::sync::Arc::new(Instrumented::new(broker))
}

#[allow(dead_code)]
fn not_compiled(scheme: &str, feature: &'static str) -> Error {
    Error::BackendNotCompiled {
        scheme: scheme.to_string(),
        feature,
    }
}
