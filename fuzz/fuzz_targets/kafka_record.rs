//! Kafka records from any client: decoding never panics and always gives an id; the
//! headers a message is published with decode to its id and headers.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use switchyard_core::backend::is_reserved_header;
use switchyard_core::Message;
use switchyard_kafka::fuzzing::{decode_record, record_headers};
use switchyard_kafka::headers;

fn name<'a>(u: &mut Unstructured<'a>) -> Result<&'a str> {
    Ok(match u.int_in_range(0..=7)? {
        0 => headers::ID,
        1 => "x-switchyard-key",
        _ => u.arbitrary()?,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let topic: &str = u.arbitrary()?;
    let (partition, offset): (i32, i64) = u.arbitrary()?;
    let key: Option<&[u8]> = u.arbitrary()?;
    let payload: Option<&[u8]> = u.arbitrary()?;
    let timestamp_ms: Option<i64> = u.arbitrary()?;
    let mut headers = Vec::new();
    for _ in 0..u.int_in_range(0..=8)? {
        headers.push((name(u)?, u.arbitrary::<Option<&[u8]>>()?));
    }
    let m = decode_record(
        (topic, partition, offset),
        key,
        &headers,
        payload,
        timestamp_ms,
    );
    assert!(!m.id.is_empty());
    assert!(m.headers.keys().all(|k| !is_reserved_header(k)));
    assert_eq!(&m.payload[..], payload.unwrap_or_default());

    // The other way: a message the producer accepts (no reserved names; no NUL, which
    // librdkafka's C-string header names cannot carry).
    let id: &str = u.arbitrary()?;
    if id.is_empty() {
        return Ok(());
    }
    let mut sent = Message::new(Vec::new()).with_id(id);
    for (k, v) in headers {
        if !is_reserved_header(k) && !k.contains('\0') {
            sent.headers.insert(
                k.to_string(),
                String::from_utf8_lossy(v.unwrap_or_default()).into(),
            );
        }
    }
    let written = record_headers(&sent);
    let pairs: Vec<(&str, Option<&[u8]>)> = written
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    let back = decode_record(("t", 0, 0), None, &pairs, None, None);
    assert_eq!(back.id, sent.id);
    assert_eq!(back.headers, sent.headers);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
