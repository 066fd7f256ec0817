//! Header names core reads and writes on every backend.
//!
//! Every header name switchyard defines lives in a `headers` module beside what writes
//! it: this one, [`rpc::headers`](crate::rpc::headers), the middleware's
//! `dead_letter::headers` and `retry_tiers::headers`, and each backend's own (the Kafka
//! record's id, the RabbitMQ message's key).

/// A payload's content type, set by [`Message::encode`](crate::Message::encode) and read
/// by [`Message::content_type`](crate::Message::content_type).
pub const CONTENT_TYPE: &str = "content-type";

/// The W3C trace context (`traceparent`), stamped on each published message and read
/// by the runtime to continue the trace.
pub const TRACEPARENT: &str = "traceparent";

/// The prefixes of header names reserved for backends' own fields (the message id on
/// Kafka, the key on RabbitMQ): `switchyard-` and `x-switchyard-`, in any letter case.
/// Publishing a message with such a header fails; backends drop them from what other
/// clients wrote, so no header can override a message's id or key.
pub const RESERVED_HEADER_PREFIXES: [&str; 2] = ["switchyard-", "x-switchyard-"];

/// What every header of the middleware's retry tiers starts with (`x-retry-tier`,
/// `x-retry-due-ms`, …). The middleware writes them; a backend that keeps them only on
/// the messages it routed through a retry tier itself (RabbitMQ's hold queues) drops
/// the rest by this prefix, so the name lives here, below both.
pub const RETRY_TIER_PREFIX: &str = "x-retry-";
