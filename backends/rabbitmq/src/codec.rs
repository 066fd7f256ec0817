//! A switchyard [`Message`] in AMQP properties and back: the wire format, which any
//! AMQP 0-9-1 client can speak.
//!
//! - id → `message_id`;
//! - key → the `x-switchyard-key` header (a reserved header name);
//! - headers → the `headers` table, one long-string entry each; `content-type` also sets
//!   the `content_type` property, for other AMQP clients;
//! - timestamp → `timestamp` (whole seconds, AMQP's resolution);
//! - always `delivery_mode = 2` (persistent).
//!
//! # For foreign clients
//!
//! - **Publish** to topic `T` by publishing to the durable topic exchange `T` (declare
//!   it `type=topic, durable=true`, no arguments, if it may not exist yet), mandatory
//!   and with publisher confirms if you want switchyard's guarantees. The **routing
//!   key** is the key's slot: FNV-1a 64 of the key's UTF-8 bytes (offset basis
//!   `0xcbf29ce484222325`, prime `0x100000001b3`), modulo 1024, written as its 10 bits,
//!   most significant first, joined by dots (`"customer-7"` → slot 497 →
//!   `"0.1.1.1.1.1.0.0.0.1"`). Partition `i` of a group with `n` partitions binds
//!   `#.<low log2(n) bits of i>`, so any 10-bit key reaches exactly one partition of
//!   every group; a message without a key may use any slot. Put the key in the header
//!   `x-switchyard-key` (long string), the id in `message_id` (without one, switchyard
//!   makes a new id for each delivery, so set it), your headers in the `headers` table
//!   as strings (other types are ignored on receipt).
//! - **Consume** what switchyard publishes by binding your own queue to exchange `T`
//!   (`#` for everything, or a partition pattern); read the id from `message_id`, the
//!   key from `x-switchyard-key`, headers from the `headers` table, the payload as is.
//!   Bind before publishing starts: RabbitMQ routes only to queues that exist.
//! - A switchyard group `G` consumes the queues `T:G.p0 … T:G.p<n-1>` (default 8); do not
//!   consume those yourself, or you take its messages.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use switchyard_core::{Bytes, Error, Headers, Message, Result, CONTENT_TYPE_HEADER};

use crate::topology::is_hold_queue;

/// The header that carries a message's key.
pub const KEY_HEADER: &str = "x-switchyard-key";

fn short(what: &str, s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|_| {
        Error::config(
            what,
            format!(
                "{s:?} is {} bytes; AMQP short strings hold at most 255",
                s.len()
            ),
        )
    })
}

/// The AMQP properties of `message`.
pub(crate) fn properties(message: &Message) -> Result<BasicProperties> {
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        if name == KEY_HEADER {
            return Err(Error::config(
                "headers",
                format!("the header name {KEY_HEADER:?} is reserved for the message key; use Message::with_key"),
            ));
        }
        headers.insert(
            short("header name", name)?,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    if let Some(key) = &message.key {
        headers.insert(
            KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(key.as_bytes())),
        );
    }
    let secs = message
        .timestamp
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut props = BasicProperties::default()
        .with_message_id(short("message id", &message.id)?)
        .with_delivery_mode(2)
        .with_timestamp(secs)
        .with_headers(headers);
    if let Some(ct) = message.content_type() {
        if let Ok(ct) = ShortString::try_new(ct) {
            props = props.with_content_type(ct);
        }
    }
    Ok(props)
}

fn as_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn as_count(v: &AMQPValue) -> Option<u64> {
    match v {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

/// A received message and its attempt number (1 + `x-delivery-count` where a quorum
/// queue set it, else 1; the subscription refines it).
pub(crate) fn decode(props: &BasicProperties, data: Vec<u8>) -> (Arc<Message>, u32) {
    let mut headers = Headers::new();
    let mut key = None;
    let mut attempt = 1u32;
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            match name.as_str() {
                KEY_HEADER => key = as_string(value),
                "x-delivery-count" => {
                    let count = as_count(value).unwrap_or(0);
                    attempt = u32::try_from(count.saturating_add(1)).unwrap_or(u32::MAX);
                }
                other => {
                    // Non-string entries are the broker's own (x-death tables and the like).
                    if let Some(v) = as_string(value) {
                        headers.insert(other.to_string(), v);
                    }
                }
            }
        }
    }
    strip_hold_deaths(&mut headers);
    if !headers.contains_key(CONTENT_TYPE_HEADER) {
        if let Some(ct) = props.content_type() {
            headers.insert(CONTENT_TYPE_HEADER.to_string(), ct.as_str().to_string());
        }
    }
    let mut message = Message::new(Bytes::from(data));
    if let Some(id) = props.message_id() {
        message.id = id.as_str().to_string();
    }
    message.key = key;
    message.headers = headers;
    if let Some(ts) = props.timestamp() {
        message.timestamp = UNIX_EPOCH + Duration::from_secs(*ts);
    } else {
        message.timestamp = SystemTime::now();
    }
    (Arc::new(message), attempt)
}

/// Removes the string headers RabbitMQ adds when a delayed redelivery's hold queue
/// dead-letters the message on expiry (`x-first-death-*`, and `x-last-death-*` on 3.13
/// and later), so the redelivered message has exactly the headers it was published
/// with. Death headers naming any other queue were there before (a native dead letter
/// read back) and stay.
fn strip_hold_deaths(headers: &mut Headers) {
    for family in ["x-first-death", "x-last-death"] {
        let queue = headers.get(&format!("{family}-queue"));
        let reason = headers.get(&format!("{family}-reason"));
        if queue.is_some_and(|q| is_hold_queue(q)) && reason.is_some_and(|r| r == "expired") {
            for field in ["queue", "reason", "exchange"] {
                headers.remove(&format!("{family}-{field}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_properties() {
        let m = Message::new("x")
            .with_key("kéy/1")
            .with_header("ünï", "välue")
            .with_header("empty", "")
            .with_header(CONTENT_TYPE_HEADER, "application/json");
        let props = properties(&m).unwrap();
        let (back, attempt) = decode(&props, b"x".to_vec());
        assert_eq!(attempt, 1);
        assert_eq!(back.id, m.id);
        assert_eq!(back.key, m.key);
        assert_eq!(back.headers, m.headers);
        let reserved = Message::new("x").with_header(KEY_HEADER, "k");
        assert!(properties(&reserved).is_err());
    }

    #[test]
    fn hold_queue_death_headers_are_dropped_and_others_kept() {
        let with = |queue: &str| {
            let mut table = FieldTable::default();
            for (k, v) in [
                ("x-first-death-queue", queue),
                ("x-first-death-reason", "expired"),
                ("x-first-death-exchange", "t:g.delay.100"),
                ("mine", "kept"),
            ] {
                table.insert(k.into(), AMQPValue::LongString(v.into()));
            }
            let props = BasicProperties::default().with_headers(table);
            decode(&props, Vec::new()).0
        };
        let delayed = with("t:g.delay.100");
        assert_eq!(delayed.headers.len(), 1, "{:?}", delayed.headers);
        assert_eq!(delayed.headers["mine"], "kept");
        let dead_lettered = with("t:g.p3");
        assert_eq!(
            dead_lettered.headers.len(),
            4,
            "{:?}",
            dead_lettered.headers
        );
    }
}
