//! Request/reply for backend authors. The requester's machinery lives here, so a
//! backend supplies only its transport:
//!
//! 1. an **inbox**: an address string and a stream of the reply messages sent to it
//!    ([`Inbox`]), opened once per broker client, lazily, on its first request;
//! 2. **sending a reply to an address** (override
//!    [`Broker::send_reply`](crate::Broker::send_reply)).
//!
//! The backend keeps a [`Requester`] field and implements
//! [`Broker::request`](crate::Broker::request) as
//! `self.requester.request(self, || open_inbox(..), topic, message, timeout)`, and
//! [`Broker::close`](crate::Broker::close) calls [`Requester::close`]. The requester keeps
//! the pending requests by correlation id, enforces the timeout, drops late replies (with a
//! `tracing` debug line), and ends pending requests with a typed error on close.
//! [`pubsub`] is a transport over plain publish/subscribe (a reply topic per process,
//! read by an ephemeral group) that any backend can use as it is.

mod requester;

pub mod pubsub;

pub use requester::{Inbox, Requester};
