//! Mapping between switchyard messages and Kafka records.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::Message as _;
use switchyard_core::backend::is_reserved_header;
use switchyard_core::{Bytes, Headers, Message};

use crate::headers;

/// The record headers of a message: its id first, then its headers.
pub(crate) fn headers(message: &Message) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(message.headers.len() + 1).insert(Header {
        key: headers::ID,
        value: Some(message.id.as_bytes()),
    });
    for (k, v) in &message.headers {
        h = h.insert(Header {
            key: k.as_str(),
            value: Some(v.as_bytes()),
        });
    }
    h
}

/// Milliseconds since the epoch, Kafka's record timestamp: saturating, since a
/// message from another broker may carry a time past what 64 bits of milliseconds hold,
/// and a wrapped, negative one would be taken for "no timestamp" or break fetches.
pub(crate) fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The id of a record without a switchyard id header (written by another client):
/// stable across redeliveries because it names the record's position.
pub(crate) fn foreign_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("kafka:{topic}:{partition}:{offset}")
}

/// A consumed record as a switchyard message. Total: records from other clients are
/// accepted whatever they hold. Bytes that are not UTF-8 (key, header values) are decoded
/// lossily; a header without a value becomes an empty string; other reserved headers
/// (`switchyard-*`, `x-switchyard-*`) are dropped; a timestamp the clock cannot hold is
/// left at the time of receipt.
///
/// The id is the one `switchyard-id` header. A record with none, an empty one, or more
/// than one (a forged or careless producer) gets an id derived from its position
/// instead, which no other record shares.
pub(crate) fn to_message(record: &BorrowedMessage<'_>) -> Message {
    let parts = |with_headers: bool| Record {
        topic: record.topic(),
        partition: record.partition(),
        offset: record.offset(),
        key: record.key(),
        headers: record
            .headers()
            .filter(|_| with_headers)
            .into_iter()
            .flat_map(|h| h.iter())
            .map(|h| (h.key, h.value)),
        payload: record.payload(),
        timestamp_ms: record.timestamp().to_millis(),
    };
    // The client library panics on a header name that is not UTF-8 (another producer
    // may write one): the record is then decoded without its headers rather than
    // taking the partition's reader down with it.
    without_panic(
        || decode(parts(true)),
        || {
            tracing::warn!(
                topic = record.topic(),
                partition = record.partition(),
                offset = record.offset(),
                "a record header's name is not UTF-8; the record is handed on without its headers"
            );
            decode(parts(false))
        },
    )
}

/// `f`, or `fallback` if `f` panics.
fn without_panic<T>(f: impl FnOnce() -> T, fallback: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| fallback())
}

/// Refuses a header name librdkafka cannot carry whole: it cuts a name at a NUL
/// character, so `a\0b` would arrive as `a`.
pub(crate) fn check_header_names(message: &Message) -> switchyard_core::Result<()> {
    match message.headers.keys().find(|name| name.contains('\0')) {
        None => Ok(()),
        Some(name) => Err(switchyard_core::Error::config(
            "headers",
            format!("the header name {name:?} holds a NUL character, which Kafka header names cannot carry; rename the header"),
        )),
    }
}

/// A record's parts, as the client library hands them over.
pub(crate) struct Record<'a, H> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) headers: H,
    pub(crate) payload: Option<&'a [u8]>,
    pub(crate) timestamp_ms: Option<i64>,
}

/// [`to_message`] on a record's parts.
pub(crate) fn decode<'a, H>(record: Record<'a, H>) -> Message
where
    H: Iterator<Item = (&'a str, Option<&'a [u8]>)>,
{
    let mut ids = Vec::new();
    let mut hdrs = Headers::new();
    for (name, value) in record.headers {
        let value = value
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        if name == headers::ID {
            ids.push(value);
        } else if !is_reserved_header(name) {
            hdrs.insert(name.to_string(), value);
        }
    }
    let id = match <[String; 1]>::try_from(ids) {
        Ok([id]) if !id.is_empty() => id,
        _ => foreign_id(record.topic, record.partition, record.offset),
    };
    let mut m =
        Message::new(Bytes::copy_from_slice(record.payload.unwrap_or_default())).with_id(id);
    m.key = record.key.map(|k| String::from_utf8_lossy(k).into_owned());
    m.headers = hdrs;
    if let Some(at) = record
        .timestamp_ms
        .and_then(|ms| u64::try_from(ms).ok())
        .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
    {
        m.timestamp = at;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_decode_falls_back() {
        let v = without_panic(|| -> u32 { panic!("not UTF-8") }, || 7);
        assert_eq!(v, 7);
        assert_eq!(without_panic(|| 1, || 7), 1);
    }

    #[test]
    fn header_names_with_nul_are_refused() {
        assert!(check_header_names(&Message::new("x").with_header("a\0b", "v")).is_err());
        assert!(check_header_names(&Message::new("x").with_header("a-b", "v")).is_ok());
    }

    fn record<'a>(
        headers: &'a [(&'a str, Option<&'a [u8]>)],
        timestamp_ms: Option<i64>,
    ) -> Message {
        decode(Record {
            topic: "t",
            partition: 3,
            offset: 42,
            key: Some(&[0xff, b'k']),
            headers: headers.iter().copied(),
            payload: None,
            timestamp_ms,
        })
    }

    #[test]
    fn one_id_header_is_the_id() {
        let m = record(&[("switchyard-id", Some(b"abc")), ("h", None)], Some(5));
        assert_eq!(m.id, "abc");
        assert_eq!(m.headers["h"], "");
        assert_eq!(m.key.as_deref(), Some("\u{fffd}k"));
        assert_eq!(m.timestamp, UNIX_EPOCH + Duration::from_millis(5));
        assert!(m.payload.is_empty());
    }

    #[test]
    fn duplicate_empty_or_missing_ids_give_the_position_id() {
        let position = foreign_id("t", 3, 42);
        for headers in [
            &[
                ("switchyard-id", Some(&b"real"[..])),
                ("switchyard-id", Some(b"forged")),
            ][..],
            &[("switchyard-id", Some(b""))],
            &[("switchyard-id", None)],
            &[],
        ] {
            assert_eq!(record(headers, None).id, position, "{headers:?}");
        }
    }

    #[test]
    fn reserved_headers_are_dropped_and_odd_timestamps_ignored() {
        let before = std::time::SystemTime::now();
        for ts in [Some(-1), Some(i64::MIN), Some(i64::MAX), None] {
            let m = record(
                &[
                    ("x-switchyard-key", Some(b"k")),
                    ("Switchyard-Id", Some(b"x")),
                ],
                ts,
            );
            assert!(m.headers.is_empty(), "{:?}", m.headers);
            if ts != Some(i64::MAX) {
                assert!(m.timestamp >= before);
            }
        }
    }

    #[test]
    fn headers_round_trip_with_the_id_first() {
        let m = Message::new("p").with_id("id-1").with_header("a", "b");
        let h = headers(&m);
        let pairs: Vec<(&str, Option<&[u8]>)> = h.iter().map(|h| (h.key, h.value)).collect();
        let back = decode(Record {
            topic: "t",
            partition: 0,
            offset: 0,
            key: None,
            headers: pairs.into_iter(),
            payload: Some(b"p"),
            timestamp_ms: Some(millis(m.timestamp)),
        });
        assert_eq!(back.id, "id-1");
        assert_eq!(back.headers, m.headers);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use std::time::SystemTime;

    /// Header names a producer might send: arbitrary text, and the names decoding
    /// treats specially, in other cases too.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "\\PC{0,12}",
            1 => Just(headers::ID.to_string()),
            1 => Just("Switchyard-ID".to_string()),
            1 => Just("x-switchyard-key".to_string()),
            1 => Just("content-type".to_string()),
        ]
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..24),
            "\\PC{0,16}".prop_map(String::into_bytes),
        ]
    }

    fn lossy(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever another client wrote, decoding gives a message: an id, no reserved
        /// headers, the payload and key as sent, a timestamp only where the clock holds it.
        #[test]
        fn any_record_decodes(
            topic in "\\PC{0,8}",
            partition in any::<i32>(),
            offset in any::<i64>(),
            key in proptest::option::of(bytes()),
            headers in proptest::collection::vec((name(), proptest::option::of(bytes())), 0..8),
            payload in proptest::option::of(bytes()),
            timestamp_ms in proptest::option::of(prop_oneof![
                any::<i64>(),
                Just(i64::MAX),
                Just(i64::MIN),
                Just(-1i64),
                0..4_102_444_800_000i64,
            ]),
        ) {
            let before = SystemTime::now();
            let m = decode(Record {
                topic: &topic,
                partition,
                offset,
                key: key.as_deref(),
                headers: headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
                payload: payload.as_deref(),
                timestamp_ms,
            });
            let ids: Vec<String> = headers
                .iter()
                .filter(|(k, _)| k == headers::ID)
                .map(|(_, v)| v.as_deref().map(lossy).unwrap_or_default())
                .collect();
            match ids.as_slice() {
                [id] if !id.is_empty() => prop_assert_eq!(&m.id, id),
                _ => prop_assert_eq!(&m.id, &foreign_id(&topic, partition, offset)),
            }
            prop_assert!(!m.id.is_empty());
            prop_assert!(m.headers.keys().all(|k| !is_reserved_header(k)), "{:?}", m.headers);
            for (k, v) in &m.headers {
                // The last value of a repeated name wins.
                let sent = headers
                    .iter()
                    .rev()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.as_deref().map(lossy).unwrap_or_default());
                prop_assert_eq!(sent.as_ref(), Some(v));
            }
            prop_assert_eq!(&m.payload[..], payload.as_deref().unwrap_or_default());
            prop_assert_eq!(m.key, key.as_deref().map(lossy));
            match timestamp_ms.filter(|ms| *ms >= 0) {
                Some(ms) => prop_assert_eq!(
                    m.timestamp,
                    UNIX_EPOCH + Duration::from_millis(ms as u64)
                ),
                None => prop_assert!(m.timestamp >= before),
            }
        }

        /// What the producer writes (`headers`) decodes to the message's id and headers,
        /// for any message it publishes (no reserved header names).
        ///
        /// Names with a NUL are left out: librdkafka hands header names back as C
        /// strings, so such a name comes back cut at the NUL.
        #[test]
        fn published_headers_decode_to_the_same_message(
            id in "\\PC{1,40}",
            key in proptest::option::of("\\PC{0,16}"),
            sent in proptest::collection::btree_map("[^\\x00]{0,12}", "\\PC{0,16}", 0..8),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            millis_since_epoch in 0..4_102_444_800_000u64,
        ) {
            let mut m = Message::new(payload.clone()).with_id(id);
            m.key = key;
            m.timestamp = UNIX_EPOCH + Duration::from_millis(millis_since_epoch);
            m.headers = sent.into_iter().filter(|(k, _)| !is_reserved_header(k)).collect();
            let h = headers(&m);
            let pairs: Vec<(&str, Option<&[u8]>)> = h.iter().map(|h| (h.key, h.value)).collect();
            let back = decode(Record {
                topic: "t",
                partition: 0,
                offset: 0,
                key: m.key.as_deref().map(str::as_bytes),
                headers: pairs.into_iter(),
                payload: Some(&payload),
                timestamp_ms: Some(millis(m.timestamp)),
            });
            prop_assert_eq!(&back.id, &m.id);
            prop_assert_eq!(&back.headers, &m.headers);
            prop_assert_eq!(&back.key, &m.key);
            prop_assert_eq!(&back.payload, &m.payload);
            prop_assert_eq!(back.timestamp, m.timestamp);
        }
    }

    #[test]
    fn a_timestamp_past_what_milliseconds_hold_saturates() {
        let far = UNIX_EPOCH + Duration::from_secs(i64::MAX as u64);
        assert_eq!(millis(far), i64::MAX);
        assert_eq!(millis(UNIX_EPOCH + Duration::from_millis(5)), 5);
        assert_eq!(millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
