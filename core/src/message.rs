//! The message model: what is published, and what a publish returns.

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{Codec, JsonCodec};
use crate::error::Result;
use crate::headers::{CONTENT_TYPE, RESERVED_HEADER_PREFIXES};

/// Message headers: a sorted string map, carried byte for byte by every backend.
pub type Headers = BTreeMap<String, String>;

/// Whether `name` is reserved (see [`RESERVED_HEADER_PREFIXES`]). Backends drop such
/// headers from what other clients wrote, and refuse them on publish, so no header can
/// override a message's id or key.
pub fn is_reserved_header(name: &str) -> bool {
    RESERVED_HEADER_PREFIXES.iter().any(|prefix| {
        name.len() >= prefix.len()
            && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    })
}

/// A configuration error if `message` carries a reserved header; every backend calls
/// this before it publishes.
pub fn check_headers(message: &Message) -> Result<()> {
    match message.headers.keys().find(|name| is_reserved_header(name)) {
        None => Ok(()),
        Some(name) => Err(crate::error::Error::config(
            "headers",
            format!(
                "the header name {name:?} is reserved (names starting with \"switchyard-\" or \"x-switchyard-\" carry the message's id and key); set the id with Message::with_id and the key with Message::with_key, or rename the header"
            ),
        )),
    }
}

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
        Ok(Self::new(payload).with_header(CONTENT_TYPE, codec.content_type()))
    }

    /// Sets the ordering key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Replaces the generated id (for example with a business id, so a republish of
    /// the same event is recognised as a duplicate).
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Adds or replaces a header. Names starting with one of
    /// [`RESERVED_HEADER_PREFIXES`](crate::headers::RESERVED_HEADER_PREFIXES) are the
    /// backends' own: publishing a message that carries one fails with a configuration
    /// error.
    #[must_use]
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
        self.headers.get(CONTENT_TYPE).map(String::as_str)
    }
}

/// A new unique message id: a UUIDv7 (RFC 9562) in the usual hyphenated lower-case
/// form, so ids sort by creation time (kind to database indexes).
///
/// Its 74 bits below the millisecond timestamp are random, drawn from `rand`'s
/// thread-local generator (a CSPRNG initialised from the operating system; uuid's `fast-rng`),
/// so guessing another message's id is not a practical attack (RFC 9562 §6.9). Ids
/// still should not be used as secrets.
pub fn new_id() -> String {
    id_at(SystemTime::now())
}

/// The UUIDv7 for `time`, without a shared counter: unique through its random bits, so
/// threads making ids never contend.
fn id_at(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
    let id = uuid::Uuid::new_v7(ts);
    id.hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    #[test]
    fn reserved_header_names_are_refused_in_any_case() {
        for name in ["switchyard-id", "X-Switchyard-Key", "SWITCHYARD-anything"] {
            assert!(is_reserved_header(name), "{name}");
            let e = check_headers(&Message::new("x").with_header(name, "v")).unwrap_err();
            assert!(e.to_string().contains(name), "{e}");
        }
        for name in ["switchyard", "x-switchyar", "my-switchyard-id", "", "ü"] {
            assert!(!is_reserved_header(name), "{name}");
        }
        assert!(check_headers(&Message::new("x").with_header("source", "web")).is_ok());
    }

    #[test]
    fn ids_are_uuid_v7_with_the_timestamp() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(0x0190_1234_5678);
        let id = id_at(at);
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 7, "{id}");
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
        assert_eq!(id, parsed.hyphenated().to_string(), "lower-case hyphenated");
        let (secs, nanos) = parsed.get_timestamp().unwrap().to_unix();
        assert_eq!(
            Duration::new(secs, nanos),
            Duration::from_millis(0x0190_1234_5678)
        );
        assert!(
            id_at(at + Duration::from_millis(1)) > id,
            "ids sort by time"
        );
    }

    #[test]
    fn ids_are_unique_within_and_across_threads() {
        let at = SystemTime::now();
        let per_thread = 50_000;
        let ids: Vec<Vec<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(move || (0..per_thread).map(|_| id_at(at)).collect()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let unique: HashSet<&String> = ids.iter().flatten().collect();
        assert_eq!(unique.len(), 4 * per_thread, "same millisecond, no repeats");
    }
}
