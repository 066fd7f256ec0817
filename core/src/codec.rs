//! Codecs turn typed values into payloads and back. JSON through serde is the default.

use std::any::type_name;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Result};

/// Encodes and decodes typed payloads.
pub trait Codec: Send + Sync + 'static {
    /// The MIME type written to the `content-type` header.
    fn content_type(&self) -> &'static str;
    /// Encodes a value.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes>;
    /// Decodes a value; failure is [`Error::Decode`], never a panic.
    fn decode<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T>;
}

/// JSON through `serde_json`.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| Error::Encode {
                content_type: self.content_type().into(),
                target: type_name::<T>(),
                source: Box::new(e),
            })
    }

    fn decode<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T> {
        serde_json::from_slice(payload).map_err(|e| Error::Decode {
            content_type: self.content_type().into(),
            target: type_name::<T>(),
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Order {
        id: u64,
    }

    #[test]
    fn round_trip_and_typed_decode_error() {
        let bytes = JsonCodec.encode(&Order { id: 7 }).unwrap();
        assert_eq!(JsonCodec.decode::<Order>(&bytes).unwrap(), Order { id: 7 });
        let err = JsonCodec.decode::<Order>(b"\xff not json").unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err}");
        assert!(err.to_string().contains("Order"), "{err}");
    }
}
