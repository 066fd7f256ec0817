//! Property tests: any properties another client may send decode to a message, and
//! every message switchyard accepts comes back as it went.

use super::*;
use lapin::types::{ByteArray, DecimalValue, FieldArray};
use proptest::prelude::*;
use std::collections::BTreeMap;
use switchyard_core::rpc::headers::{CORRELATION_ID, REPLY_TO};

/// Header names: arbitrary text, and those decoding treats specially.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,12}",
        1 => Just(headers::KEY.to_string()),
        1 => Just(CONTENT_TYPE.to_string()),
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
        prop_assert_eq!(m.key.clone(), sent.get(headers::KEY).and_then(as_text));
        for (k, v) in &m.headers {
            prop_assert!(!is_reserved_header(k), "{k}");
            let from_table = sent.get(k.as_str()).and_then(as_text);
            let property = match k.as_str() {
                CONTENT_TYPE => props.content_type(),
                REPLY_TO => props.reply_to(),
                CORRELATION_ID => props.correlation_id(),
                _ => &None,
            };
            let from_property = property.as_ref().map(|c| c.as_str().to_string());
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
                m.headers.keys().all(|k| !k.starts_with(RETRY_TIER_PREFIX)),
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
            prop_oneof![8 => "\\PC{0,12}", 1 => "[a-z]{250,260}", 1 => Just(headers::KEY.to_string())]
                .prop_filter("steered by where it came from", |k| {
                    !k.starts_with(RETRY_TIER_PREFIX)
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
            m.headers.insert(CONTENT_TYPE.to_string(), ct);
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
