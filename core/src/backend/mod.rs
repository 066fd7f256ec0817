//! What backend authors need and applications do not: the ack handle a backend
//! implements, broker URL parsing and redaction, the name and header rules every
//! backend enforces, trace-context stamping, the per-key gate, the retry pause, and the
//! requester's machinery for request/reply ([`rpc`]).
//!
//! Applications use the crate root (and the `switchyard` facade); a crate that adds a
//! broker to switchyard uses this module as well.
//!
//! ## The per-key gate
//! [`KeyGate`] holds "one message per key in flight, in arrival order" for every
//! backend. Items arrive in order, each with an optional key. A keyless item is ready at
//! once. A keyed item is ready only when no earlier item of its key is unsettled: the
//! first item of a key goes out, the later ones wait until the caller settles the key,
//! and then the next one becomes ready. An item given back for redelivery
//! ([`KeyGate::requeue`]) is ready again and still heads its key, so its successors keep
//! waiting behind it. The gate is pure state (no I/O, no locks, no clocks): the backend
//! wraps it in whatever lock it already holds, and decides what counts as settled.
//!
//! When the broker itself redelivers a nacked item (RabbitMQ puts it back at the head
//! of its queue), the gate has nothing to do in between: an item taken out and not
//! settled keeps its key busy, so later same-key arrivals wait. When the redelivery
//! arrives the backend recognises it (by message id: only it knows what makes two
//! deliveries the same message) and hands it in with [`KeyGate::requeue`] instead of
//! [`KeyGate::push`], so it is ready again at once and still ahead of its key's waiting
//! successors.
//!
//! [`KeyGate::pop_run`] takes a ready item together with the waiting successors of its
//! key, in order, for a handler that processes a batch of one key at once. A run is out
//! as one: settling its key once settles all of it.

mod backoff;
mod key_gate;
pub mod rpc;
mod settled;

pub use crate::delivery::Acker;
pub use crate::headers::RESERVED_HEADER_PREFIXES;
pub use crate::message::{check_headers, is_reserved_header};
pub use crate::names::{validate_name, MAX_NAME_LEN};
pub use crate::url::{redact, BrokerUrl};
pub use backoff::Backoff;
pub use key_gate::KeyGate;
pub use settled::settled;

use crate::headers::TRACEPARENT;
use crate::message::Message;
use crate::observe::TraceContext;

/// Stamps `message` with a `traceparent` (continuing the current handler's trace, or a
/// new one) unless it has one; returns the context it carries.
pub fn stamp(message: &mut Message) -> TraceContext {
    if let Some(ctx) = message
        .headers
        .get(TRACEPARENT)
        .and_then(|v| TraceContext::parse(v))
    {
        return ctx;
    }
    let ctx = TraceContext::current().map_or_else(TraceContext::new_root, |c| c.child());
    message.headers.insert(TRACEPARENT.into(), ctx.to_header());
    ctx
}
