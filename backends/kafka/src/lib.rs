//! # switchyard-kafka
//!
//! The Apache Kafka backend (rdkafka). Not implemented in this release: connecting
//! returns a typed error that says so.
//!
//! ```
//! let err = futures::executor::block_on(switchyard_kafka::connect("kafka://127.0.0.1:9092")).err().unwrap();
//! assert!(err.to_string().contains("not implemented"));
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

use switchyard_core::{AnyBroker, Error, Result};

/// Connects to Kafka from a `kafka://host:port[,host:port][?setting=value]` URL.
pub async fn connect(url: &str) -> Result<AnyBroker> {
    let _ = url;
    Err(Error::Unsupported {
        backend: "kafka",
        what: "connecting yet: the Kafka backend is not implemented in this release".into(),
    })
}
