//! The message model: what is published, and what a publish returns.

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{Codec, JsonCodec, CONTENT_TYPE_HEADER};
use crate::error::Result;

/// Message headers: a sorted string map, carried byte for byte by every backend.
pub type Headers = BTreeMap<String, String>;

/// A message: what a producer publishes and a consumer receives.
///
/// ```
/// use switchyard_core::Message;
/// let m = Message::new("hello").with_key("customer-7").with_header("source", "web");
/// assert_eq!(m.key.as_deref(), Some("customer-7"));
/// assert_eq!(m.payload.as_ref(), b"hello");
/// assert!(!m.id.is_empty());
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Message {
    /// Unique id; generated when the message is built (a UUIDv7), kept across
    /// redeliveries, retries and dead-letter replays. The idempotency key.
    pub id: String,
    /// Ordering and partitioning key: messages with the same key are handled one at a
    /// time, in publish order, within a group.
    pub key: Option<String>,
    /// Application headers.
    pub headers: Headers,
    /// The body.
    pub payload: Bytes,
    /// When the message was created (or, for foreign messages, when the broker stamped it).
    pub timestamp: SystemTime,
}

impl Message {
    /// A message with this payload, a fresh id and the current time.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        // One clock read for both the id and the timestamp.
        let timestamp = SystemTime::now();
        Self {
            id: id_at(timestamp),
            key: None,
            headers: Headers::new(),
            payload: payload.into(),
            timestamp,
        }
    }

    /// A message whose payload is `value` encoded as JSON, with a `content-type` header.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Self::encode(&JsonCodec, value)
    }

    /// A message whose payload is `value` encoded with `codec`.
    pub fn encode<C: Codec, T: Serialize + ?Sized>(codec: &C, value: &T) -> Result<Self> {
        let payload = codec.encode(value)?;
        Ok(Self::new(payload).with_header(CONTENT_TYPE_HEADER, codec.content_type()))
    }

    /// Sets the ordering key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Replaces the generated id (for example with a business id, so a republish of
    /// the same event is recognised as a duplicate).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Adds or replaces a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Decodes the payload as JSON.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T> {
        JsonCodec.decode(&self.payload)
    }

    /// The `content-type` header, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.headers.get(CONTENT_TYPE_HEADER).map(String::as_str)
    }
}

/// A new unique message id: a UUIDv7, so ids sort by creation time (kind to database indexes).
pub fn new_id() -> String {
    id_at(SystemTime::now())
}

fn id_at(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
    // 74 random bits per id: unique without a shared counter between threads.
    uuid::Uuid::new_v7(ts).to_string()
}

/// Where a published message landed, once the broker accepted it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Receipt {
    /// The message id.
    pub id: String,
    /// The partition, where the backend has partitions.
    pub partition: Option<i32>,
    /// The offset in the partition (or log position), where the backend has offsets.
    pub offset: Option<i64>,
}

impl Receipt {
    /// A receipt for a message id, with its position if the backend has one.
    pub fn new(id: impl Into<String>, partition: Option<i32>, offset: Option<i64>) -> Self {
        Self {
            id: id.into(),
            partition,
            offset,
        }
    }
}
