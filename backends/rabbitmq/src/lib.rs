//! # switchyard-rabbitmq
//!
//! The RabbitMQ backend (lapin). Not implemented in this release: connecting returns a
//! typed error that says so.
//!
//! ```
//! let err = futures::executor::block_on(switchyard_rabbitmq::connect("amqp://guest:guest@127.0.0.1:5672/%2f")).err().unwrap();
//! assert!(err.to_string().contains("not implemented"));
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

use switchyard_core::{AnyBroker, Error, Result};

/// Connects to RabbitMQ from an `amqp://` or `amqps://` URL.
pub async fn connect(url: &str) -> Result<AnyBroker> {
    let _ = url;
    Err(Error::Unsupported {
        backend: "rabbitmq",
        what: "connecting yet: the RabbitMQ backend is not implemented in this release".into(),
    })
}
