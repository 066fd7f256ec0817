//! Examples of the wire format, both ways, and of what decoding does with odd input.

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
        .with_header(CONTENT_TYPE, "application/json");
    let props = properties(&m).unwrap();
    let back = decode(&props, b"x".to_vec());
    assert_eq!(back.id, m.id);
    assert_eq!(back.key, m.key);
    assert_eq!(back.headers, m.headers);
    let reserved = Message::new("x").with_header(headers::KEY, "k");
    assert!(properties(&reserved).is_err());
    let bare = Message::new("x");
    let props = properties(&bare).unwrap();
    assert!(props.headers().is_none(), "no empty table on the wire");
    let back = decode(&props, b"x".to_vec());
    assert!(back.key.is_none() && back.headers.is_empty());
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
        (headers::KEY, AMQPValue::LongLongInt(42)),
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
    for absent in ["array", "table", "void", headers::KEY] {
        assert!(!h.contains_key(absent), "{absent}: {h:?}");
    }
    assert_eq!(m.key.as_deref(), Some("42"));
}

#[test]
fn a_missing_or_empty_message_id_is_derived_the_same_on_every_delivery() {
    let keyed = |key: &str| {
        BasicProperties::default().with_headers(table(vec![(
            headers::KEY,
            AMQPValue::LongString(key.into()),
        )]))
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
                headers::KEY,
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
        m.headers.keys().all(|k| !k.starts_with(RETRY_TIER_PREFIX)),
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
