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
//!   `x-switchyard-key` (long string), the id in `message_id`, your headers in the
//!   `headers` table as strings (other types are ignored on receipt). Without a
//!   `message_id`, switchyard derives the id from the message's content and properties
//!   (see `decode`), so two identical publishes share an id: set one.
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
/// The most property bytes one AMQP header frame carries on a broker with RabbitMQ's
/// default `frame_max` of 131,072: less the frame's 8 bytes and the content header's
/// 14. Properties do not continue into another frame, so more is refused up front
/// rather than sent (the broker would close the connection).
pub(crate) const MAX_PROPERTY_BYTES: usize = 131_072 - 8 - 14;

/// The encoded size of `message`'s properties, as [`properties`] writes them.
fn property_bytes(message: &Message) -> usize {
    let entry = |name: &str, value: &str| 1 + name.len() + 1 + 4 + value.len();
    let table: usize = 4
        + message
            .headers
            .iter()
            .map(|(n, v)| entry(n, v))
            .sum::<usize>()
        + message.key.as_deref().map_or(0, |k| entry(KEY_HEADER, k));
    let content_type = message.content_type().map_or(0, |ct| 1 + ct.len());
    2 + table + (1 + message.id.len()) + 1 + 8 + content_type
}

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
/// A missing or empty `message_id` gets an id derived from the message (see
/// [`derived_id`]), the same on every delivery, so a requeued message is recognised when
/// it comes back; a timestamp beyond what the system clock can hold becomes the time of
/// receipt; header values of any type are kept as text where they have one.
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
/// takes them for one message: the second may get the first's attempt number, and an
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_too_large_for_a_frame_are_refused_up_front() {
        let fits = Message::new("x").with_header("h", "v".repeat(MAX_PROPERTY_BYTES - 200));
        assert!(properties(&fits).is_ok());
        let over = fits.with_header("more", "v".repeat(300));
        let e = properties(&over).unwrap_err();
        assert!(!e.is_transient(), "{e}");
        assert!(e.to_string().contains("frame"), "{e}");
    }

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
    fn a_missing_or_empty_message_id_is_derived_the_same_on_every_delivery() {
        let keyed = |key: &str| {
            BasicProperties::default()
                .with_headers(table(vec![(KEY_HEADER, AMQPValue::LongString(key.into()))]))
        };
        let empty = keyed("k").with_message_id("".into());
        let a = decode(&empty, b"x".to_vec());
        assert_eq!(a.id, decode(&empty, b"x".to_vec()).id, "stable");
        assert_eq!(
            a.id,
            decode(&keyed("k"), b"x".to_vec()).id,
            "empty is absent"
        );
        assert!(a.id.starts_with("amqp-") && a.id.len() == 37, "{}", a.id);
        // Anything the publisher set tells two publishes apart.
        let others = [
            decode(&keyed("k"), b"y".to_vec()),
            decode(&keyed("j"), b"x".to_vec()),
            decode(&keyed("k").with_timestamp(1), b"x".to_vec()),
            decode(&keyed("k").with_correlation_id("c".into()), b"x".to_vec()),
            decode(&BasicProperties::default(), b"x".to_vec()),
            decode(
                &BasicProperties::default().with_headers(table(vec![(
                    KEY_HEADER,
                    AMQPValue::ShortString("k".into()),
                )])),
                b"x".to_vec(),
            ),
        ];
        let mut ids: Vec<&str> = others.iter().map(|m| m.id.as_str()).collect();
        ids.push(&a.id);
        let distinct: std::collections::HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
        // A message id, when there is one, is used as it is.
        let with_id = keyed("k").with_message_id("given".into());
        assert_eq!(decode(&with_id, b"x".to_vec()).id, "given");
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

#[cfg(test)]
mod proptests {
    use super::*;
    use lapin::types::{ByteArray, DecimalValue, FieldArray};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Header names: arbitrary text, and those decoding treats specially.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "\\PC{0,12}",
            1 => Just(KEY_HEADER.to_string()),
            1 => Just(CONTENT_TYPE_HEADER.to_string()),
            1 => Just("switchyard-id".to_string()),
            1 => Just("x-retry-tier".to_string()),
            1 => Just("x-retry-due-ms".to_string()),
            1 => Just("x-first-death-queue".to_string()),
            1 => Just("x-first-death-reason".to_string()),
            1 => Just("x-last-death-queue".to_string()),
            1 => Just("x-last-death-reason".to_string()),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "\\PC{0,16}",
            1 => Just("expired".to_string()),
            1 => Just("t:g.delay.100".to_string()),
            1 => Just("t:g.p0".to_string()),
        ]
    }

    fn short_string() -> impl Strategy<Value = ShortString> {
        prop_oneof![
            text(),
            // Up to the 255-byte limit, in multi-byte characters too.
            "\\PC{60,63}",
        ]
        .prop_map(|s| {
            let mut s = s;
            while s.len() > 255 {
                s.pop();
            }
            ShortString::from(s)
        })
    }

    fn value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<f32>().prop_map(AMQPValue::Float),
            any::<f64>().prop_map(AMQPValue::Double),
            (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
            short_string().prop_map(AMQPValue::ShortString),
            text().prop_map(|s| AMQPValue::LongString(s.into())),
            proptest::collection::vec(any::<u8>(), 0..16)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            proptest::collection::vec(any::<u8>(), 0..16)
                .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                proptest::collection::btree_map(name(), inner, 0..4)
                    .prop_map(|m| AMQPValue::FieldTable(table(m))),
            ]
        })
    }

    fn table(entries: BTreeMap<String, AMQPValue>) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in entries {
            table.insert(k.into(), v);
        }
        table
    }

    prop_compose! {
        fn props()(
            message_id in proptest::option::of(short_string()),
            content_type in proptest::option::of(short_string()),
            correlation_id in proptest::option::of(short_string()),
            timestamp in proptest::option::of(prop_oneof![
                any::<u64>(),
                0..4_102_444_800u64,
            ]),
            headers in proptest::option::of(
                proptest::collection::btree_map(name(), value(), 0..8)
            ),
            priority in proptest::option::of(any::<u8>()),
            delivery_mode in proptest::option::of(any::<u8>()),
        ) -> BasicProperties {
            let mut p = BasicProperties::default();
            if let Some(v) = message_id { p = p.with_message_id(v); }
            if let Some(v) = content_type { p = p.with_content_type(v); }
            if let Some(v) = correlation_id { p = p.with_correlation_id(v); }
            if let Some(v) = timestamp { p = p.with_timestamp(v); }
            if let Some(v) = headers { p = p.with_headers(table(v)); }
            if let Some(v) = priority { p = p.with_priority(v); }
            if let Some(v) = delivery_mode { p = p.with_delivery_mode(v); }
            p
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever another client sent, decoding gives a message: its `message_id` or a
        /// stable derived one, the payload as sent, the key and headers from the table
        /// as text, no reserved headers, a timestamp only where the clock holds it.
        #[test]
        fn any_properties_decode(props in props(), data in proptest::collection::vec(any::<u8>(), 0..32)) {
            let before = SystemTime::now();
            let m = decode(&props, data.clone());
            match props.message_id().as_ref().filter(|id| !id.as_str().is_empty()) {
                Some(id) => prop_assert_eq!(m.id.as_str(), id.as_str()),
                None => {
                    prop_assert!(m.id.starts_with("amqp-") && m.id.len() == 37, "{}", m.id);
                    prop_assert_eq!(&decode(&props, data.clone()).id, &m.id);
                }
            }
            prop_assert_eq!(&m.payload[..], &data[..]);
            let empty = FieldTable::default();
            let sent = props.headers().as_ref().unwrap_or(&empty).inner();
            prop_assert_eq!(m.key.clone(), sent.get(KEY_HEADER).and_then(as_text));
            for (k, v) in &m.headers {
                prop_assert!(!is_reserved_header(k), "{k}");
                let from_table = sent.get(k.as_str()).and_then(as_text);
                let from_property = (k == CONTENT_TYPE_HEADER)
                    .then(|| props.content_type().as_ref().map(|c| c.as_str().to_string()))
                    .flatten();
                prop_assert!(
                    from_table.as_ref() == Some(v) || from_property.as_ref() == Some(v),
                    "{k}: {v:?}"
                );
            }
            let hold_death = ["x-first-death", "x-last-death"].iter().any(|f| {
                let get = |field: &str| sent.get(format!("{f}-{field}").as_str()).and_then(as_text);
                get("queue").is_some_and(|q| is_hold_queue(&q)) && get("reason").as_deref() == Some("expired")
            });
            if !hold_death {
                prop_assert!(
                    m.headers.keys().all(|k| !k.starts_with(RETRY_HEADER_PREFIX)),
                    "{:?}", m.headers
                );
            }
            match props.timestamp().and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s))) {
                Some(at) => prop_assert_eq!(m.timestamp, at),
                None => prop_assert!(m.timestamp >= before),
            }
        }

        /// A message the encoder accepts comes back from its properties with the same
        /// id, key, headers and payload, and its timestamp to the second; the encoder
        /// refuses exactly the messages AMQP cannot carry.
        ///
        /// Retry and death headers are left out of the headers: decoding drops or
        /// keeps them by where the message came from (see the unit tests).
        #[test]
        fn accepted_messages_round_trip(
            id in prop_oneof![4 => "\\PC{1,40}", 1 => "[a-z]{250,260}"],
            key in proptest::option::of("\\PC{0,16}"),
            sent in proptest::collection::btree_map(
                prop_oneof![8 => "\\PC{0,12}", 1 => "[a-z]{250,260}", 1 => Just(KEY_HEADER.to_string())]
                    .prop_filter("steered by where it came from", |k| {
                        !k.starts_with(RETRY_HEADER_PREFIX)
                            && !k.starts_with("x-first-death-")
                            && !k.starts_with("x-last-death-")
                    }),
                "\\PC{0,16}",
                0..8,
            ),
            content_type in proptest::option::of("\\PC{0,16}"),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            millis in any::<i64>().prop_map(|ms| ms % 4_102_444_800_000),
        ) {
            let mut m = Message::new(payload.clone()).with_id(id);
            m.key = key;
            m.headers = sent;
            if let Some(ct) = content_type {
                m.headers.insert(CONTENT_TYPE_HEADER.to_string(), ct);
            }
            m.timestamp = if millis >= 0 {
                UNIX_EPOCH + Duration::from_millis(millis as u64)
            } else {
                UNIX_EPOCH - Duration::from_millis(millis.unsigned_abs())
            };
            let carriable = m.id.len() <= 255
                && m.headers.keys().all(|k| k.len() <= 255 && !is_reserved_header(k));
            let props = match properties(&m) {
                Ok(props) => props,
                Err(e) => {
                    prop_assert!(!carriable, "refused: {e}");
                    return Ok(());
                }
            };
            prop_assert!(carriable);
            let back = decode(&props, payload);
            prop_assert_eq!(&back.id, &m.id);
            prop_assert_eq!(&back.key, &m.key);
            prop_assert_eq!(&back.headers, &m.headers);
            prop_assert_eq!(&back.payload, &m.payload);
            let secs = m.timestamp.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            prop_assert_eq!(back.timestamp, UNIX_EPOCH + Duration::from_secs(secs));
        }
    }
}
