//! Typed requests for every broker.

use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::broker::Broker;
use crate::error::Result;
use crate::message::Message;

/// Typed request helpers for every [`Broker`].
#[async_trait]
pub trait RequestExt: Broker {
    /// Sends `request` as JSON to `topic` and decodes the reply's payload as JSON;
    /// errors as [`Broker::request`], plus [`Error::Decode`](crate::Error::Decode) for a
    /// reply that is not a `Resp`.
    async fn request_json<Req, Resp>(
        &self,
        topic: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp>
    where
        Req: Serialize + Sync + ?Sized,
        Resp: DeserializeOwned,
    {
        let reply = self
            .request(topic, Message::json(request)?, timeout)
            .await?;
        reply.decode_json()
    }
}

impl<B: Broker + ?Sized> RequestExt for B {}
