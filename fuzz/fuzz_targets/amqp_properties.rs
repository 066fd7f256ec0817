//! AMQP properties from any client: decoding never panics and always gives an id; a
//! message the encoder accepts decodes to the same id, key, headers and payload.
#![no_main]

use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use switchyard_core::backend::is_reserved_header;
use switchyard_core::Message;
use switchyard_rabbitmq::fuzzing::{decode, properties};
use switchyard_rabbitmq::headers;

fn short(u: &mut Unstructured<'_>) -> Result<ShortString> {
    let mut s: String = u.arbitrary()?;
    while s.len() > 255 {
        s.pop();
    }
    Ok(ShortString::from(s))
}

fn name(u: &mut Unstructured<'_>) -> Result<ShortString> {
    Ok(match u.int_in_range(0..=9)? {
        0 => headers::KEY.into(),
        1 => "x-retry-tier".into(),
        2 => "x-first-death-queue".into(),
        3 => "x-first-death-reason".into(),
        4 => "content-type".into(),
        _ => short(u)?,
    })
}

fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<AMQPValue> {
    let top = if depth >= 4 { 16 } else { 18 };
    Ok(match u.int_in_range(0..=top)? {
        0 => AMQPValue::Boolean(u.arbitrary()?),
        1 => AMQPValue::ShortShortInt(u.arbitrary()?),
        2 => AMQPValue::ShortShortUInt(u.arbitrary()?),
        3 => AMQPValue::ShortInt(u.arbitrary()?),
        4 => AMQPValue::ShortUInt(u.arbitrary()?),
        5 => AMQPValue::LongInt(u.arbitrary()?),
        6 => AMQPValue::LongUInt(u.arbitrary()?),
        7 => AMQPValue::LongLongInt(u.arbitrary()?),
        8 => AMQPValue::Float(u.arbitrary()?),
        9 => AMQPValue::Double(u.arbitrary()?),
        10 => AMQPValue::DecimalValue(DecimalValue {
            scale: u.arbitrary()?,
            value: u.arbitrary()?,
        }),
        11 => AMQPValue::ShortString(short(u)?),
        12 => AMQPValue::LongString(LongString::from(u.arbitrary::<Vec<u8>>()?)),
        13 => AMQPValue::ByteArray(ByteArray::from(u.arbitrary::<Vec<u8>>()?)),
        14 => AMQPValue::Timestamp(u.arbitrary()?),
        15 => AMQPValue::Void,
        16 => AMQPValue::LongString(LongString::from(
            ["expired", "t:g.delay.100", "t:g.p0"][u.choose_index(3)?],
        )),
        17 => {
            let mut items = Vec::new();
            for _ in 0..u.int_in_range(0..=4)? {
                items.push(value(u, depth + 1)?);
            }
            AMQPValue::FieldArray(FieldArray::from(items))
        }
        _ => AMQPValue::FieldTable(table(u, depth + 1)?),
    })
}

fn table(u: &mut Unstructured<'_>, depth: u32) -> Result<FieldTable> {
    let mut t = FieldTable::default();
    for _ in 0..u.int_in_range(0..=8)? {
        t.insert(name(u)?, value(u, depth)?);
    }
    Ok(t)
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut p = BasicProperties::default();
    if u.arbitrary()? {
        p = p.with_message_id(short(u)?);
    }
    if u.arbitrary()? {
        p = p.with_content_type(short(u)?);
    }
    if u.arbitrary()? {
        p = p.with_correlation_id(short(u)?);
    }
    if u.arbitrary()? {
        p = p.with_timestamp(u.arbitrary()?);
    }
    if u.arbitrary()? {
        p = p.with_priority(u.arbitrary()?);
    }
    if u.arbitrary()? {
        p = p.with_headers(table(u, 0)?);
    }
    let data: Vec<u8> = u.arbitrary()?;
    let m = decode(&p, data.clone());
    assert!(!m.id.is_empty());
    assert_eq!(&m.payload[..], &data[..]);
    assert!(m.headers.keys().all(|k| !is_reserved_header(k)));
    assert_eq!(decode(&p, data).id, m.id, "ids are stable");

    // The other way: what the encoder accepts round-trips.
    let mut sent = Message::new(u.arbitrary::<Vec<u8>>()?).with_id(u.arbitrary::<String>()?);
    sent.key = u.arbitrary()?;
    for _ in 0..u.int_in_range(0..=6)? {
        let k: String = u.arbitrary()?;
        if !k.starts_with("x-retry-")
            && !k.starts_with("x-first-death-")
            && !k.starts_with("x-last-death-")
        {
            sent.headers.insert(k, u.arbitrary()?);
        }
    }
    if let Ok(props) = properties(&sent) {
        let back = decode(&props, sent.payload.to_vec());
        if !sent.id.is_empty() {
            assert_eq!(back.id, sent.id);
        }
        assert_eq!(back.key, sent.key);
        assert_eq!(back.headers, sent.headers);
        assert_eq!(back.payload, sent.payload);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
