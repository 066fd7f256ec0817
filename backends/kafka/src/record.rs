//! Mapping between switchyard messages and Kafka records.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::Message as _;
use switchyard_core::{Bytes, Headers, Message};

/// The record header carrying the switchyard message id. Every other application
/// header travels as a record header of the same name (the `content-type` header
/// included), with its value as UTF-8 bytes.
pub const ID_HEADER: &str = "switchyard-id";

/// The record headers of a message: its id first, then its headers.
pub(crate) fn headers(message: &Message) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(message.headers.len() + 1).insert(Header {
        key: ID_HEADER,
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

/// Milliseconds since the epoch, Kafka's record timestamp.
pub(crate) fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The id of a record without a switchyard id header (written by another client):
/// stable across redeliveries because it names the record's position.
pub(crate) fn foreign_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("kafka:{topic}:{partition}:{offset}")
}

/// A consumed record as a switchyard message. Records from other clients (no id
/// header, non-UTF-8 key or header values) are accepted: ids are derived from the
/// record's position and bytes are decoded lossily.
pub(crate) fn to_message(record: &BorrowedMessage<'_>) -> Message {
    let mut id = None;
    let mut hdrs = Headers::new();
    if let Some(h) = record.headers() {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            if header.key == ID_HEADER {
                id = Some(value);
            } else {
                hdrs.insert(header.key.to_string(), value);
            }
        }
    }
    let id = id.unwrap_or_else(|| foreign_id(record.topic(), record.partition(), record.offset()));
    let mut m =
        Message::new(Bytes::copy_from_slice(record.payload().unwrap_or_default())).with_id(id);
    m.key = record
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    m.headers = hdrs;
    if let Some(ms) = record.timestamp().to_millis() {
        if ms >= 0 {
            m.timestamp = UNIX_EPOCH + Duration::from_millis(ms as u64);
        }
    }
    m
}
