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
use switchyard_core::{
    check_headers, is_reserved_header, Bytes, Error, Headers, Message, Result, CONTENT_TYPE_HEADER,
};

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
    check_headers(message)?;
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
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

/// A header value as text. Strings are taken as they are (invalid UTF-8 replaced),
/// scalars are written out, byte arrays decoded lossily; tables, arrays and void have no
/// text form (`None`: RabbitMQ's own `x-death` tables are of this kind).
fn as_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::DecimalValue(d) => {
            // value × 10^-scale, written exactly.
            let digits = d.value.to_string();
            let scale = usize::from(d.scale);
            if scale == 0 {
                digits
            } else {
                let padded = format!("{digits:0>width$}", width = scale + 1);
                let (int, frac) = padded.split_at(padded.len() - scale);
                format!("{int}.{frac}")
            }
        }
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) | AMQPValue::Void => return None,
    })
}

/// The prefix of the retry-tier headers (`x-retry-tier`, `x-retry-due-ms`, …). They
/// steer a redelivery, so they are kept only on a message that came back through one of
/// the group's hold queues, which switchyard itself writes; on anything else they are
/// dropped, so no other client can park a handler or re-route a retry.
pub(crate) const RETRY_HEADER_PREFIX: &str = "x-retry-";

/// A received message. Total: whatever another client wrote, the answer is a message.
/// A missing or empty `message_id` gets a new id (per delivery: set one to get
/// redeliveries recognised); a timestamp beyond what the system clock can hold becomes
/// the time of receipt; header values of any type are kept as text where they have one.
///
/// `x-delivery-count` is not read as an attempt count: partition queues are classic
/// queues, where the broker never sets it, so any such header came from a client. The
/// attempt number is the member's own count (see the gate).
pub(crate) fn decode(props: &BasicProperties, data: Vec<u8>) -> Arc<Message> {
    let mut headers = Headers::new();
    let mut key = None;
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            let Some(text) = as_text(value) else { continue };
            if name.as_str() == KEY_HEADER {
                key = Some(text);
            } else if !is_reserved_header(name.as_str()) {
                headers.insert(name.as_str().to_string(), text);
            }
        }
    }
    if !strip_hold_deaths(&mut headers) {
        headers.retain(|name, _| !name.starts_with(RETRY_HEADER_PREFIX));
    }
    if !headers.contains_key(CONTENT_TYPE_HEADER) {
        if let Some(ct) = props.content_type() {
            headers.insert(CONTENT_TYPE_HEADER.to_string(), ct.as_str().to_string());
        }
    }
    let mut message = Message::new(Bytes::from(data));
    if let Some(id) = props
        .message_id()
        .as_ref()
        .filter(|id| !id.as_str().is_empty())
    {
        message.id = id.as_str().to_string();
    }
    message.key = key;
    message.headers = headers;
    message.timestamp = props
        .timestamp()
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .unwrap_or_else(SystemTime::now);
    Arc::new(message)
}

/// Removes the string headers RabbitMQ adds when a delayed redelivery's hold queue
/// dead-letters the message on expiry (`x-first-death-*`, and `x-last-death-*` on 3.13
/// and later), so the redelivered message has exactly the headers it was published
/// with. Death headers naming any other queue were there before (a native dead letter
/// read back) and stay. Returns whether the message came back through a hold queue.
fn strip_hold_deaths(headers: &mut Headers) -> bool {
    let mut held = false;
    for family in ["x-first-death", "x-last-death"] {
        let queue = headers.get(&format!("{family}-queue"));
        let reason = headers.get(&format!("{family}-reason"));
        if queue.is_some_and(|q| is_hold_queue(q)) && reason.is_some_and(|r| r == "expired") {
            for field in ["queue", "reason", "exchange"] {
                headers.remove(&format!("{family}-{field}"));
            }
            held = true;
        }
    }
    held
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
        let back = decode(&props, b"x".to_vec());
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
            decode(&props, Vec::new())
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

    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in entries {
            table.insert(k.into(), v);
        }
        table
    }

    #[test]
    fn a_timestamp_beyond_the_clock_is_the_time_of_receipt() {
        let before = SystemTime::now();
        for ts in [u64::MAX, u64::MAX / 2, i64::MAX as u64 + 1] {
            let props = BasicProperties::default().with_timestamp(ts);
            let m = decode(&props, b"x".to_vec());
            assert!(m.timestamp >= before, "timestamp {ts}");
        }
        let props = BasicProperties::default().with_timestamp(1_700_000_000);
        let m = decode(&props, Vec::new());
        assert_eq!(m.timestamp, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    }

    #[test]
    fn header_values_of_every_type_are_kept_as_text() {
        use lapin::types::{ByteArray, DecimalValue, FieldArray};
        let props = BasicProperties::default().with_headers(table(vec![
            ("bool", AMQPValue::Boolean(true)),
            ("i8", AMQPValue::ShortShortInt(-8)),
            ("i64", AMQPValue::LongLongInt(i64::MIN)),
            ("u32", AMQPValue::LongUInt(u32::MAX)),
            ("f64", AMQPValue::Double(1.5)),
            ("ts", AMQPValue::Timestamp(u64::MAX)),
            (
                "dec",
                AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 5 }),
            ),
            (
                "bytes",
                AMQPValue::ByteArray(ByteArray::from(vec![0xff, b'a'])),
            ),
            (
                "long",
                AMQPValue::LongString(LongString::from(vec![0xc3, 0x28])),
            ),
            ("array", AMQPValue::FieldArray(FieldArray::default())),
            ("table", AMQPValue::FieldTable(FieldTable::default())),
            ("void", AMQPValue::Void),
            (KEY_HEADER, AMQPValue::LongLongInt(42)),
        ]));
        let m = decode(&props, Vec::new());
        let h = &m.headers;
        assert_eq!(h["bool"], "true");
        assert_eq!(h["i8"], "-8");
        assert_eq!(h["i64"], i64::MIN.to_string());
        assert_eq!(h["u32"], u32::MAX.to_string());
        assert_eq!(h["f64"], "1.5");
        assert_eq!(h["ts"], u64::MAX.to_string());
        assert_eq!(h["dec"], "0.005");
        assert_eq!(h["bytes"], "\u{fffd}a");
        assert_eq!(h["long"], "\u{fffd}(");
        for absent in ["array", "table", "void", KEY_HEADER] {
            assert!(!h.contains_key(absent), "{absent}: {h:?}");
        }
        assert_eq!(m.key.as_deref(), Some("42"));
    }

    #[test]
    fn a_missing_or_empty_message_id_gets_a_fresh_one() {
        let empty = BasicProperties::default().with_message_id("".into());
        let a = decode(&empty, Vec::new());
        let b = decode(&BasicProperties::default(), Vec::new());
        assert!(!a.id.is_empty() && !b.id.is_empty());
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn forged_delivery_counts_and_retry_headers_are_not_trusted() {
        let forged = BasicProperties::default().with_headers(table(vec![
            ("x-delivery-count", AMQPValue::LongLongInt(99)),
            ("x-retry-tier", AMQPValue::LongString("9".into())),
            (
                "x-retry-due-ms",
                AMQPValue::LongString(u64::MAX.to_string().into()),
            ),
            (
                "x-retry-origin-topic",
                AMQPValue::LongString("elsewhere".into()),
            ),
        ]));
        let m = decode(&forged, Vec::new());
        assert_eq!(
            m.headers.get("x-delivery-count").map(String::as_str),
            Some("99")
        );
        assert!(
            m.headers
                .keys()
                .all(|k| !k.starts_with(RETRY_HEADER_PREFIX)),
            "{:?}",
            m.headers
        );
        // The same headers on a message a hold queue dead-lettered back are kept.
        let held = BasicProperties::default().with_headers(table(vec![
            ("x-retry-tier", AMQPValue::LongString("1".into())),
            (
                "x-first-death-queue",
                AMQPValue::LongString("t:g.delay.100".into()),
            ),
            (
                "x-first-death-reason",
                AMQPValue::LongString("expired".into()),
            ),
        ]));
        let m = decode(&held, Vec::new());
        assert_eq!(m.headers.get("x-retry-tier").map(String::as_str), Some("1"));
    }
}
