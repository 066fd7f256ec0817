//! Request/reply over a broker: ask a topic and wait for the answer.
//!
//! - **Requester**: [`Broker::request`](crate::Broker::request) publishes a message with a
//!   correlation id and this process's reply address in its headers, and resolves with
//!   the reply (a [`Message`](crate::Message), headers included), a [`Error::Timeout`](crate::Error::Timeout),
//!   an [`Error::ErrorReply`](crate::Error::ErrorReply) when the responder failed, or
//!   [`Error::Closed`](crate::Error::Closed) when the broker client is closed first.
//!   [`RequestExt::request_json`] does the JSON encoding both ways.
//! - **Responder**: [`reply_fn`] turns an async fn whose `Ok` value is the reply
//!   ([`Json<T>`](crate::Json), [`Message`](crate::Message), `Bytes`, `String`, `()`) into a handler for a
//!   [`Consumer`](crate::Consumer); it sends the reply through
//!   [`Broker::send_reply`](crate::Broker::send_reply) and turns an `Err` into an error reply.
//!
//! `examples/request_reply.rs` runs both sides on any backend; docs/request_reply.md
//! describes each backend's mapping.
//!
//! # For backend authors
//!
//! The requester's machinery and a generic reply transport are in
//! [`backend::rpc`](crate::backend::rpc); a backend supplies only its transport.

mod ext;
mod responder;

pub use ext::RequestExt;
pub use responder::{reply_fn, IntoReply, ReplyHandler, ReplyService};

/// Header names request/reply writes. They follow the `x-<feature>-<field>` scheme of the
/// middleware's headers (`x-dlq-*`, `x-retry-*`) and are not reserved, so every backend
/// carries them as ordinary headers.
pub mod headers {
    /// The address the reply goes to (on a request).
    pub const REPLY_TO: &str = "x-reply-to";
    /// The correlation id that matches a reply to its request (on both).
    pub const CORRELATION_ID: &str = "x-reply-correlation-id";
    /// Set on an error reply: the responder's error text.
    pub const ERROR: &str = "x-reply-error";
    /// Set on an error reply: the responder's failure kind (`transient`, `permanent`, ...).
    pub const ERROR_KIND: &str = "x-reply-error-kind";
}
