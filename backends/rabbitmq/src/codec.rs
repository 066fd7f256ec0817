//! A switchyard [`Message`] in AMQP properties and back: the wire format, which any
//! AMQP 0-9-1 client can speak.
//!
//! - id → `message_id`;
//! - key → the `x-switchyard-key` header (a reserved header name);
//! - headers → the `headers` table, one long-string entry each; `content-type` also sets
//!   the `content_type` property, for other AMQP clients;
//! - timestamp → `timestamp` (whole seconds, AMQP's resolution);
//! - the request/reply headers `x-reply-to` and `x-reply-correlation-id` → `reply_to` and
//!   `correlation_id` (see `codec/reply.rs`), so any AMQP RPC client can answer or ask;
//! - always `delivery_mode = 2` (persistent).
//!
//! # For foreign clients
//!
//! - **Publish** to topic `T` by publishing to the durable direct exchange `T` (declare
//!   it `type=direct, durable=true`, no arguments, if it may not exist yet), mandatory
//!   and with publisher confirms if you want switchyard's guarantees. The **routing
//!   key** is the key's slot as a decimal number: FNV-1a 64 of the key's UTF-8 bytes
//!   (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`), modulo 1024
//!   (`"customer-7"` → `"497"`). Partition `i` of a group with `n` partitions is bound
//!   once for each slot `s` with `s % n == i`, so each of `"0"` … `"1023"` reaches
//!   exactly one partition of every group; a message without a key may use any slot,
//!   and any other routing key reaches no group. Put the key in the header
//!   `x-switchyard-key` (long string), the id in `message_id`, your headers in the
//!   `headers` table as strings (other types are ignored on receipt). Without a
//!   `message_id`, switchyard derives the id from the message's content and properties
//!   (see `decode`), so two identical publishes share an id: set one.
//! - **Consume** what switchyard publishes by binding your own queue to exchange `T`
//!   once per slot you want (all 1024 for everything); read the id from `message_id`, the
//!   key from `x-switchyard-key`, headers from the `headers` table, the payload as is.
//!   Bind before publishing starts: RabbitMQ routes only to queues that exist.
//! - A switchyard group `G` consumes the queues `T:G.p0 … T:G.p<n-1>` (default 8); do not
//!   consume those yourself, or you take its messages.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use switchyard_core::backend::{check_headers, is_reserved_header};
use switchyard_core::headers::{CONTENT_TYPE, RETRY_TIER_PREFIX};
use switchyard_core::{Bytes, Error, Headers, Message, Result};

use crate::topology::is_hold_queue;

use crate::headers;

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

/// The most property bytes one AMQP header frame carries on a broker with RabbitMQ's
/// default `frame_max` of 131,072: less the frame's 8 bytes and the content header's
/// 14. Properties do not continue into another frame, so more is refused up front
/// rather than sent (the broker would close the connection).
pub(crate) const MAX_PROPERTY_BYTES: usize = 131_072 - 8 - 14;

/// The encoded size of `message`'s properties, as [`properties`] writes them (counting
/// the headers table even when it is left out for being empty).
fn property_bytes(message: &Message) -> usize {
    let entry = |name: &str, value: &str| 1 + name.len() + 1 + 4 + value.len();
    let table: usize = 4
        + message
            .headers
            .iter()
            .map(|(n, v)| entry(n, v))
            .sum::<usize>()
        + message.key.as_deref().map_or(0, |k| entry(headers::KEY, k));
    let content_type = message.content_type().map_or(0, |ct| 1 + ct.len());
    2 + table + (1 + message.id.len()) + 1 + 8 + content_type
}

/// The AMQP properties of `message`. An empty headers table is left out: it would cost
/// every message its bytes on the wire and in the broker's store.
pub(crate) fn properties(message: &Message) -> Result<BasicProperties> {
    check_headers(message)?;
    let size = property_bytes(message);
    if size > MAX_PROPERTY_BYTES {
        return Err(Error::permanent(
            crate::BACKEND,
            format!(
                "the headers and key of message {} take {size} bytes; one AMQP header frame carries at most {MAX_PROPERTY_BYTES} (frame_max 131072): send large values in the payload",
                message.id
            ),
        ));
    }
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        if reply::is_property(name, value) {
            continue;
        }
        headers.insert(
            short("header name", name)?,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    if let Some(key) = &message.key {
        headers.insert(
            headers::KEY.into(),
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
        .with_timestamp(secs);
    props = reply::to_properties(props, &message.headers);
    if !headers.inner().is_empty() {
        props = props.with_headers(headers);
    }
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

/// A received message. Total: whatever another client wrote, the answer is a message.
/// A missing or empty `message_id` gets an id derived from the message (see
/// [`derived_id`]), the same on every delivery, so a requeued message is recognised when
/// it comes back; a timestamp beyond what the system clock can hold becomes the time of
/// receipt; header values of any type are kept as text where they have one.
///
/// `x-delivery-count` is not read as the delivery count: partition queues are classic
/// queues, where the broker never sets it, so any such header came from a client. The
/// delivery count is the member's own (see the gate).
pub(crate) fn decode(props: &BasicProperties, data: Vec<u8>) -> Arc<Message> {
    let mut headers = Headers::new();
    let mut key = None;
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            let Some(text) = as_text(value) else { continue };
            if name.as_str() == headers::KEY {
                key = Some(text);
            } else if !is_reserved_header(name.as_str()) {
                headers.insert(name.as_str().to_string(), text);
            }
        }
    }
    // Retry-tier headers steer a redelivery, so they are kept only on a message that came
    // back through one of the group's hold queues, which switchyard itself writes;
    // dropped on anything else, so no other client can park a handler or re-route a retry.
    if !strip_hold_deaths(&mut headers) {
        headers.retain(|name, _| !name.starts_with(RETRY_TIER_PREFIX));
    }
    reply::to_headers(props, &mut headers);
    if !headers.contains_key(CONTENT_TYPE) {
        if let Some(ct) = props.content_type() {
            headers.insert(CONTENT_TYPE.to_string(), ct.as_str().to_string());
        }
    }
    let id = match props
        .message_id()
        .as_ref()
        .filter(|id| !id.as_str().is_empty())
    {
        Some(id) => id.as_str().to_string(),
        None => derived_id(props, &data),
    };
    let mut message = Message::new(Bytes::from(data));
    message.id = id;
    message.key = key;
    message.headers = headers;
    message.timestamp = props
        .timestamp()
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .unwrap_or_else(SystemTime::now);
    Arc::new(message)
}

/// FNV-1a 128, for ids derived from content: stable across processes and versions.
struct Fnv128(u128);

impl Fnv128 {
    fn new() -> Self {
        Self(0x6c62_272e_07bb_0142_62b8_2175_6295_c58d)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u128::from(*b);
            self.0 = self
                .0
                .wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
    }

    /// A field, length first, so ("ab", "c") and ("a", "bc") hash apart; an absent
    /// field differs from an empty one.
    fn field(&mut self, value: Option<&[u8]>) {
        match value {
            None => self.bytes(&[0]),
            Some(v) => {
                self.bytes(&[1]);
                self.bytes(&(v.len() as u64).to_be_bytes());
                self.bytes(v);
            }
        }
    }
}

/// The id of a message that came without a `message_id`: `amqp-` and 32 hex digits of
/// FNV-1a 128 over its payload, its whole headers table (key included) and the AMQP
/// properties a publisher sets: `timestamp`, `correlation_id`, `app_id`, `user_id`,
/// `type`, `reply_to`, `expiration`, `priority`, `delivery_mode`, `content_type` and
/// `content_encoding`. A requeue or a redelivery after a lost channel changes none of
/// them, so the same message keeps its id: the key gate recognises it coming back,
/// attempts are counted, and an idempotency layer sees a duplicate as one.
///
/// Two publishes get the same id exactly when all of those are equal: the same payload
/// and headers sent twice without a timestamp (or within the same second, AMQP's
/// timestamp resolution) and without a distinguishing `correlation_id`. Switchyard then
/// takes them for one message: the second may get the first's delivery count, and an
/// idempotency layer skips it as a duplicate. Set `message_id` (or a timestamp or
/// `correlation_id` that differs) to keep such messages apart.
pub(crate) fn derived_id(props: &BasicProperties, data: &[u8]) -> String {
    let mut h = Fnv128::new();
    h.field(Some(data));
    match props.headers() {
        None => h.field(None),
        Some(table) => {
            h.field(Some(&(table.inner().len() as u64).to_be_bytes()));
            // A BTreeMap: entries come in name order, whatever order they were sent in.
            for (name, value) in table.inner() {
                h.field(Some(name.as_str().as_bytes()));
                let text = as_text(value).unwrap_or_else(|| format!("{value:?}"));
                // Tell a header's type apart where the text alone would not.
                h.field(Some(format!("{:?}", value.get_type()).as_bytes()));
                h.field(Some(text.as_bytes()));
            }
        }
    }
    let short = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().as_bytes().to_vec());
    h.field(
        props
            .timestamp()
            .map(|t| t.to_be_bytes().to_vec())
            .as_deref(),
    );
    for s in [
        props.correlation_id(),
        props.app_id(),
        props.user_id(),
        props.kind(),
        props.reply_to(),
        props.expiration(),
        props.content_type(),
        props.content_encoding(),
    ] {
        h.field(short(s).as_deref());
    }
    h.field(props.priority().map(|p| vec![p]).as_deref());
    h.field(props.delivery_mode().map(|m| vec![m]).as_deref());
    format!("amqp-{:032x}", h.0)
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

mod reply;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
